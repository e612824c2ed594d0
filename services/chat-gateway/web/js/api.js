// The HTTP API (docs/protocol.md, "HTTP API"): register, login and the room list.

/** An API failure: `code` is the protocol's error code (or a local one), `message` is for people. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function call(path, { method = 'GET', body, token } = {}) {
  const headers = { accept: 'application/json' };
  if (body !== undefined) headers['content-type'] = 'application/json';
  if (token) headers.authorization = `Bearer ${token}`;
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: 'no-store',
    });
  } catch {
    throw new ApiError(0, 'network', 'Cannot reach the server. Check your connection and try again.');
  }
  let data = null;
  try {
    data = await response.json();
  } catch {
    // Not JSON (e.g. a proxy's own error page): fall through to the status.
  }
  if (!response.ok) {
    const error = data && data.error;
    if (error && typeof error.message === 'string') {
      throw new ApiError(response.status, error.code || 'internal', error.message);
    }
    const message =
      response.status === 429
        ? 'Too many requests. Wait a moment and try again.'
        : `The server answered ${response.status}. Try again.`;
    throw new ApiError(response.status, response.status === 429 ? 'rate_limited' : 'unavailable', message);
  }
  return data;
}

/** POST /api/register: `{token, user}`. */
export function register(username, password) {
  return call('/api/register', { method: 'POST', body: { username, password } });
}

/** POST /api/login: `{token, user}`. */
export function login(username, password) {
  return call('/api/login', { method: 'POST', body: { username, password } });
}

/** GET /api/rooms: `[{room, last_seq}]`, public rooms and the caller's direct rooms. */
export async function listRooms(token) {
  const data = await call('/api/rooms', { token });
  return Array.isArray(data && data.rooms) ? data.rooms : [];
}
