// One WebSocket to the gateway, kept open: `hello`, request/reply by `ref`, application
// pings, and reconnection with exponential backoff and jitter (docs/protocol.md).
//
// Events (this is an EventTarget; each event's `detail` carries the data):
//   state        {state: 'connecting' | 'online' | 'offline', gateway, retryInMs}
//   welcome      the `welcome` frame: the session is ready, re-join rooms now
//   frame        a server event (`message`, `typing`, `presence`) or an unmatched frame
//   unauthorized the token was refused at `hello`: log out
//   closed       {code, reason} each time a socket ends

const BACKOFF_BASE_MS = 500;
const BACKOFF_CAP_MS = 15000;
const HELLO_TIMEOUT_MS = 10000;

/** The reply was an `error` frame. */
export class ProtocolError extends Error {
  constructor(frame) {
    super(frame.message || frame.code);
    this.code = frame.code;
    this.frame = frame;
  }
}

/** The socket closed before the reply came. */
export class ConnectionLost extends Error {
  constructor() {
    super('connection lost');
    this.code = 'connection_lost';
  }
}

export function websocketUrl(location) {
  const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
  return `${scheme}//${location.host}/ws`;
}

export class Connection extends EventTarget {
  constructor(url, token) {
    super();
    this.url = url;
    this.token = token;
    this.socket = null;
    this.state = 'offline';
    this.gateway = null;
    this.session = null;
    this.generation = 0; // increases with every welcomed socket
    this.nextRef = 1;
    this.waiting = new Map(); // ref -> {resolve, reject}
    this.attempt = 0;
    this.retryTimer = null;
    this.helloTimer = null;
    this.pingTimer = null;
    this.lastHeard = 0;
    /** When the ping that is still unanswered was sent (0: none). */
    this.pingSentAt = 0;
    this.stopped = true;
    this.onOnline = () => {
      if (!this.stopped && this.retryTimer !== null) this.retryNow();
    };
  }

  start() {
    if (!this.stopped) return;
    this.stopped = false;
    window.addEventListener('online', this.onOnline);
    this.open();
  }

  /** Closes for good (log out). */
  stop() {
    this.stopped = true;
    window.removeEventListener('online', this.onOnline);
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    this.teardown(1000, 'bye');
    this.setState('offline');
  }

  get online() {
    return this.state === 'online';
  }

  /** Sends a frame and resolves with its reply; rejects with ProtocolError or ConnectionLost. */
  request(frame) {
    if (!this.online) return Promise.reject(new ConnectionLost());
    const ref = this.nextRef++;
    return new Promise((resolve, reject) => {
      this.waiting.set(ref, { resolve, reject });
      this.write({ ...frame, ref });
    });
  }

  /** Sends a frame that has no reply (`typing`). Returns false when offline. */
  notify(frame) {
    if (!this.online) return false;
    this.write(frame);
    return true;
  }

  retryNow() {
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    this.open();
  }

  // ---- internals ----

  setState(state, retryInMs = 0) {
    this.state = state;
    this.dispatchEvent(
      new CustomEvent('state', { detail: { state, gateway: this.gateway, retryInMs } }),
    );
  }

  write(frame) {
    if (this.socket && this.socket.readyState === WebSocket.OPEN) {
      this.socket.send(JSON.stringify(frame));
    }
  }

  open() {
    if (this.stopped) return;
    this.teardown(1000, 'reconnecting');
    this.setState('connecting');
    let socket;
    try {
      socket = new WebSocket(this.url);
    } catch {
      this.scheduleRetry();
      return;
    }
    this.socket = socket;
    let welcomed = false;
    let refused = false;
    const helloRef = this.nextRef++;

    socket.addEventListener('open', () => {
      if (socket !== this.socket) return;
      this.lastHeard = Date.now();
      socket.send(JSON.stringify({ type: 'hello', token: this.token, ref: helloRef }));
      this.helloTimer = setTimeout(() => {
        if (socket === this.socket && !welcomed) this.abandon(4000, 'no welcome');
      }, HELLO_TIMEOUT_MS);
    });

    socket.addEventListener('message', (event) => {
      if (socket !== this.socket) return;
      this.lastHeard = Date.now();
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch {
        return;
      }
      if (!frame || typeof frame.type !== 'string') return;
      if (!welcomed) {
        if (frame.type === 'welcome') {
          welcomed = true;
          clearTimeout(this.helloTimer);
          this.attempt = 0;
          this.gateway = frame.gateway || null;
          this.session = frame.session || null;
          this.generation += 1;
          this.startPings(frame.heartbeat_ms);
          this.setState('online');
          this.dispatchEvent(new CustomEvent('welcome', { detail: frame }));
        } else if (frame.type === 'error' && frame.code === 'unauthorized') {
          refused = true;
        }
        return;
      }
      if (frame.ref !== undefined && frame.ref !== null && this.waiting.has(frame.ref)) {
        const pending = this.waiting.get(frame.ref);
        this.waiting.delete(frame.ref);
        if (frame.type === 'error') pending.reject(new ProtocolError(frame));
        else pending.resolve(frame);
        return;
      }
      this.dispatchEvent(new CustomEvent('frame', { detail: frame }));
    });

    socket.addEventListener('close', (event) => {
      if (socket !== this.socket) return;
      this.socket = null;
      this.afterClose();
      this.dispatchEvent(
        new CustomEvent('closed', { detail: { code: event.code, reason: event.reason } }),
      );
      // 1008: the token was refused at hello. Anything else (1006 crash, 1012 drain,
      // 4001 heartbeat, 4008 slow consumer, 1009, ...) means reconnect and resume.
      if (refused || (!welcomed && event.code === 1008)) {
        this.stopped = true;
        this.setState('offline');
        this.dispatchEvent(new CustomEvent('unauthorized'));
        return;
      }
      this.scheduleRetry();
    });
    // An 'error' event is always followed by 'close'.
  }

  startPings(heartbeatMs) {
    const heartbeat = Number.isFinite(heartbeatMs) && heartbeatMs > 0 ? heartbeatMs : 25000;
    const every = Math.min(Math.max(heartbeat / 2, 2000), 20000);
    clearInterval(this.pingTimer);
    this.pingSentAt = 0;
    this.pingTimer = setInterval(() => {
      const socket = this.socket;
      if (!socket || socket.readyState !== WebSocket.OPEN) return;
      const now = Date.now();
      if (this.pingSentAt && this.lastHeard < this.pingSentAt) {
        // Nothing heard since our ping, not even its pong. Judged by the ping, not by the
        // clock: a background tab runs this timer as rarely as once a minute, and a quiet
        // but healthy socket must survive that.
        if (now - this.pingSentAt > every + 5000) this.abandon(4000, 'no pong');
        return;
      }
      const ref = `p-${this.nextRef++}`;
      this.waiting.set(ref, { resolve() {}, reject() {} });
      this.write({ type: 'ping', ref });
      this.pingSentAt = now;
    }, every);
  }

  afterClose() {
    clearTimeout(this.helloTimer);
    clearInterval(this.pingTimer);
    this.pingTimer = null;
    const waiting = [...this.waiting.values()];
    this.waiting.clear();
    for (const pending of waiting) pending.reject(new ConnectionLost());
  }

  /**
   * Gives the socket up now and reconnects: over a dead path its closing handshake can take
   * minutes, while the page would show it online and hold sends as "Sending…".
   */
  abandon(code, reason) {
    this.teardown(code, reason);
    this.dispatchEvent(new CustomEvent('closed', { detail: { code, reason } }));
    this.scheduleRetry();
  }

  teardown(code, reason) {
    const socket = this.socket;
    if (!socket) return;
    this.socket = null;
    this.afterClose();
    try {
      socket.close(code, reason);
    } catch {
      // already closing
    }
  }

  scheduleRetry() {
    if (this.stopped) return;
    // Exponential backoff with jitter: half fixed, half random, so a crowd of clients
    // dropped by one gateway does not come back in step.
    const ceiling = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** this.attempt);
    const delay = Math.round(ceiling / 2 + Math.random() * (ceiling / 2));
    this.attempt = Math.min(this.attempt + 1, 16);
    this.setState('offline', delay);
    clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(() => {
      this.retryTimer = null;
      this.open();
    }, delay);
  }
}
