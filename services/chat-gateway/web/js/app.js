// The web client: log in, the room list, conversations, presence and typing, with a
// connection that resumes by seq after any drop (docs/web-client.md).
//
// Every string that came from a user (names, rooms, bodies, error messages) reaches the page
// through textContent or createTextNode, never as HTML.

import * as api from './api.js';
import { Connection, ConnectionLost, websocketUrl } from './connection.js';
import { Room, PUBLIC_ROOM, USERNAME, directRoom, directPeer, displayName } from './room.js';

const PAGE_SIZE = 50;
const TYPING_SEND_EVERY_MS = 2000;
const TYPING_SHOW_MS = 4000;
const NEAR_BOTTOM_PX = 80;
const NEAR_TOP_PX = 120;
const GROUP_WITHIN_MS = 5 * 60 * 1000;
const ROOM_LIST_REFRESH_MS = 60000;
const MAX_BODY_CHARS = 4000;
/** Messages a room keeps in memory and on the page; older ones are read again on scroll-back. */
const MAX_KEPT_PER_ROOM = 2000;

const $ = (id) => document.getElementById(id);
const ui = {
  authView: $('auth-view'),
  loginForm: $('login-form'),
  username: $('username'),
  password: $('password'),
  loginButton: $('login-button'),
  registerButton: $('register-button'),
  authError: $('auth-error'),
  chatView: $('chat-view'),
  roomsToggle: $('rooms-toggle'),
  peopleToggle: $('people-toggle'),
  peopleCount: $('people-count'),
  roomTitle: $('room-title'),
  leaveRoom: $('leave-room'),
  leaveLabel: document.querySelector('#leave-room .label'),
  connection: $('connection'),
  connectionLabel: $('connection-label'),
  me: $('me'),
  logout: $('logout'),
  joinForm: $('join-form'),
  joinInput: $('join-room-input'),
  dmForm: $('dm-form'),
  dmInput: $('dm-input'),
  sidebarError: $('sidebar-error'),
  roomList: $('room-list'),
  roomListEmpty: $('room-list-empty'),
  messages: $('messages'),
  messageLists: $('message-lists'),
  loadOlder: $('load-older'),
  historyStart: $('history-start'),
  emptyState: $('empty-state'),
  newMessages: $('new-messages'),
  typing: $('typing'),
  composerForm: $('composer-form'),
  composer: $('composer'),
  sendButton: $('send-button'),
  online: $('online'),
  onlineCount: $('online-count'),
  scrim: $('scrim'),
};

// ---------------------------------------------------------------------------------------
// State

const store = {
  token: () => localStorage.getItem('chat.token'),
  user: () => localStorage.getItem('chat.user'),
  save(token, user) {
    localStorage.setItem('chat.token', token);
    localStorage.setItem('chat.user', user);
  },
  clear() {
    localStorage.removeItem('chat.token');
    localStorage.removeItem('chat.user');
  },
  openRooms(user) {
    try {
      const saved = JSON.parse(localStorage.getItem(`chat.rooms.${user}`) || '{}');
      return {
        open: Array.isArray(saved.open) ? saved.open.filter((r) => typeof r === 'string') : [],
        current: typeof saved.current === 'string' ? saved.current : null,
      };
    } catch {
      return { open: [], current: null };
    }
  },
  saveOpenRooms(user, open, current) {
    localStorage.setItem(`chat.rooms.${user}`, JSON.stringify({ open, current }));
  },
};

let me = null; // username
let token = null;
let conn = null;
const rooms = new Map(); // open rooms: name -> Room (with .view)
let listed = new Map(); // GET /api/rooms: name -> last_seq
let current = null; // the room on screen
let outbox = []; // messages the user sent that have no `sent` yet, in order
let roomListTimer = null;
let leaveArmedFor = null; // the room whose Leave was pressed once while it had unsent messages

function uuid() {
  if (crypto.randomUUID) return crypto.randomUUID();
  // Not a secure context (plain http on a LAN name): build a v4 UUID by hand.
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, '0')).join('');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

function node(tag, className, text) {
  const element = document.createElement(tag);
  if (className) element.className = className;
  if (text !== undefined) element.textContent = text;
  return element;
}

const narrow = window.matchMedia('(max-width: 640px)');

// ---------------------------------------------------------------------------------------
// Log in / log out

function showAuth(message = '') {
  ui.chatView.hidden = true;
  ui.authView.hidden = false;
  ui.authError.textContent = message;
  document.title = 'Chat';
  ui.username.value = ui.username.value || store.user() || '';
  (ui.username.value ? ui.password : ui.username).focus();
}

ui.loginForm.addEventListener('submit', async (event) => {
  event.preventDefault();
  const action = event.submitter === ui.registerButton ? 'register' : 'login';
  const username = ui.username.value.trim();
  const password = ui.password.value;
  if (!username || !password) {
    ui.authError.textContent = 'Enter a username and a password.';
    (username ? ui.password : ui.username).focus();
    return;
  }
  ui.authError.textContent = '';
  ui.loginButton.disabled = ui.registerButton.disabled = true;
  ui.loginForm.setAttribute('aria-busy', 'true');
  try {
    const result = action === 'register' ? await api.register(username, password) : await api.login(username, password);
    store.save(result.token, result.user);
    ui.password.value = '';
    enterChat();
  } catch (error) {
    ui.authError.textContent = error.message;
    ui.password.focus();
  } finally {
    ui.loginButton.disabled = ui.registerButton.disabled = false;
    ui.loginForm.removeAttribute('aria-busy');
  }
});

function enterChat() {
  token = store.token();
  me = store.user();
  if (!token || !me) {
    showAuth();
    return;
  }
  resetChat();
  ui.authView.hidden = true;
  ui.chatView.hidden = false;
  ui.me.textContent = me;
  conn = new Connection(websocketUrl(window.location), token);
  conn.addEventListener('state', (event) => onConnectionState(event.detail));
  conn.addEventListener('welcome', () => onWelcome());
  conn.addEventListener('frame', (event) => onServerEvent(event.detail));
  conn.addEventListener('closed', (event) => {
    ui.connection.dataset.closeCode = String(event.detail.code);
  });
  conn.addEventListener('unauthorized', () => logout('Your session has expired. Log in again.'));
  conn.start();
  const saved = store.openRooms(me);
  for (const name of saved.open) openRoom(name, { activate: false });
  const first = saved.current && rooms.has(saved.current) ? saved.current : saved.open[0];
  if (first && rooms.has(first)) setCurrent(first);
  else renderConversation();
  refreshRoomList();
  roomListTimer = setInterval(refreshRoomList, ROOM_LIST_REFRESH_MS);
  // Keyboard users start where the next step is: writing, or picking a room.
  if (!narrow.matches) (current ? ui.composer : ui.joinInput).focus();
}

function resetChat() {
  if (conn) conn.stop();
  conn = null;
  clearInterval(roomListTimer);
  for (const room of rooms.values()) for (const timer of room.typing.values()) clearTimeout(timer);
  rooms.clear();
  listed = new Map();
  outbox = [];
  current = null;
  ui.messageLists.replaceChildren();
  ui.roomList.replaceChildren();
  ui.sidebarError.textContent = '';
  ui.composer.value = '';
  closeDrawers();
}

function logout(message = '') {
  resetChat();
  token = null;
  me = null;
  store.clear();
  ui.password.value = '';
  showAuth(message);
}

ui.logout.addEventListener('click', () => logout());

// ---------------------------------------------------------------------------------------
// Connection

const STATE_LABELS = { connecting: 'Connecting…', online: 'Online', offline: 'Offline · reconnecting' };

function onConnectionState({ state, gateway }) {
  ui.connection.dataset.state = state;
  ui.connection.dataset.gateway = gateway || '';
  ui.connectionLabel.textContent = STATE_LABELS[state] || state;
  ui.connection.title = gateway ? `${STATE_LABELS[state]} (gateway ${gateway})` : STATE_LABELS[state];
  if (state !== 'online') {
    for (const room of rooms.values()) room.joinedOn = 0;
  }
  for (const item of outbox) renderPendingStatus(item);
}

function onWelcome() {
  // Resume every open room from the last seq received; the backlog fills the gap.
  for (const room of rooms.values()) joinRoom(room);
  refreshRoomList();
}

function onServerEvent(frame) {
  const room = rooms.get(frame.room);
  if (!room) return;
  if (frame.type === 'message') {
    room.noteReceived(frame.seq);
    insertMessages(room, [frame], 'live');
  } else if (frame.type === 'typing') {
    if (typeof frame.user !== 'string' || frame.user === me) return;
    clearTimeout(room.typing.get(frame.user));
    room.typing.set(
      frame.user,
      setTimeout(() => {
        room.typing.delete(frame.user);
        if (room.name === current) renderTyping();
      }, TYPING_SHOW_MS),
    );
    if (room.name === current) renderTyping();
  } else if (frame.type === 'presence') {
    if (typeof frame.user !== 'string') return;
    if (frame.state === 'online') room.online.add(frame.user);
    else {
      room.online.delete(frame.user);
      stopTyping(room, frame.user);
    }
    if (room.name === current) renderPeople();
  }
}

function stopTyping(room, user) {
  if (!room.typing.has(user)) return;
  clearTimeout(room.typing.get(user));
  room.typing.delete(user);
  if (room.name === current) renderTyping();
}

// ---------------------------------------------------------------------------------------
// Rooms

async function refreshRoomList() {
  if (!token) return;
  const forToken = token;
  try {
    const list = await api.listRooms(forToken);
    if (token !== forToken) return;
    listed = new Map(list.map((r) => [r.room, r.last_seq]));
    renderRoomList();
  } catch (error) {
    if (token !== forToken) return;
    if (error.status === 401) logout('Your session has expired. Log in again.');
    // Anything else: keep the list we have; the next refresh tries again.
  }
}

function createRoomView(room) {
  const list = node('ol', 'message-list');
  list.setAttribute('aria-label', `Messages in ${displayName(room.name, me)}`);
  const pending = node('ol', 'message-list pending-list');
  return { list, pending, scrollTop: 0, atBottom: true, newCount: 0, lastTypingSent: 0 };
}

function openRoom(name, { activate = true } = {}) {
  let room = rooms.get(name);
  if (!room) {
    room = new Room(name);
    room.view = createRoomView(room);
    rooms.set(name, room);
    saveOpenRooms();
    joinRoom(room);
  }
  if (activate) setCurrent(name);
  renderRoomList();
  return room;
}

function closeRoom(name) {
  const room = rooms.get(name);
  if (!room) return;
  rooms.delete(name);
  for (const timer of room.typing.values()) clearTimeout(timer);
  outbox = outbox.filter((item) => item.room !== name);
  room.view.list.remove();
  room.view.pending.remove();
  if (current === name) {
    current = null;
    renderConversation();
  }
  saveOpenRooms();
  renderRoomList();
}

function saveOpenRooms() {
  if (me) store.saveOpenRooms(me, [...rooms.keys()], current);
}

/**
 * The user is done with a room: the gateway stops sending it (the others see them go), it
 * stays in the list to open again, and a reload does not reopen it. The next open room, if
 * any, takes its place on screen.
 */
function leaveRoom(name) {
  const room = rooms.get(name);
  if (!room) return;
  if (conn && conn.online && (room.joinedOn === conn.generation || room.joining === conn.generation)) {
    // A join still on its way is answered first: frames are handled in order.
    conn.request({ type: 'leave', room: name }).catch(() => {});
  }
  closeRoom(name);
  const next = [...rooms.keys()].sort(byListOrder)[0];
  if (next) setCurrent(next);
  if (!narrow.matches) (current ? ui.composer : ui.joinInput).focus();
}

ui.leaveRoom.addEventListener('click', () => {
  const name = current;
  if (!name) return;
  const unsent = outbox.filter((item) => item.room === name && item.state !== 'failed').length;
  if (unsent > 0 && leaveArmedFor !== name) {
    // Typed messages are not thrown away on one click: the second one confirms.
    leaveArmedFor = name;
    ui.leaveLabel.textContent = 'Leave anyway';
    ui.leaveRoom.classList.add('armed');
    ui.typing.textContent =
      unsent === 1
        ? '1 message is not sent yet: leaving now discards it.'
        : `${unsent} messages are not sent yet: leaving now discards them.`;
    return;
  }
  leaveRoom(name);
});

function joinErrorMessage(error, name) {
  const peer = directPeer(name, me);
  if (error.code === 'not_found' && peer) return `There is no user named “${peer}”.`;
  if (error.code === 'forbidden') return `You cannot open ${name}.`;
  return `Could not open ${displayName(name, me)}: ${error.message}`;
}

async function joinRoom(room) {
  if (rooms.get(room.name) !== room) return; // closed, or another login since
  if (!conn || !conn.online) return; // joined after the next `welcome`
  const generation = conn.generation;
  if (room.joining === generation || room.joinedOn === generation) return;
  room.joining = generation;
  const frame = { type: 'join', room: room.name };
  if (room.baseline !== null || room.seqs.length > 0) frame.since = room.resumeSince();
  try {
    const joined = await conn.request(frame);
    if (rooms.get(room.name) !== room || !conn || conn.generation !== generation) return;
    room.joinedOn = generation;
    if (room.baseline === null) room.baseline = Number.isInteger(joined.last_seq) ? joined.last_seq : 0;
    room.online = new Set(Array.isArray(joined.online) ? joined.online : []);
    if (room.name === current) {
      renderPeople();
      renderComposer();
    }
    if (!room.initialLoaded) loadInitial(room);
    flushOutbox(room);
  } catch (error) {
    if (error instanceof ConnectionLost || rooms.get(room.name) !== room) return;
    if (['not_found', 'forbidden', 'bad_request'].includes(error.code)) {
      closeRoom(room.name);
      ui.sidebarError.textContent = joinErrorMessage(error, room.name);
      if (!listed.has(room.name)) renderRoomList();
    } else {
      // unavailable, rate_limited, internal: try again shortly on this connection.
      setTimeout(() => joinRoom(room), 1500 + Math.random() * 1000);
    }
  } finally {
    if (room.joining === generation) room.joining = null;
  }
}

async function loadInitial(room) {
  if (rooms.get(room.name) !== room || room.loadingOlder || !conn || !conn.online) return;
  room.loadingOlder = true;
  renderHistoryTop();
  try {
    const page = await conn.request({ type: 'history', room: room.name, limit: PAGE_SIZE });
    room.initialLoaded = true;
    room.hasOlder = Boolean(page.has_more);
    insertMessages(room, page.messages || [], 'initial');
  } catch (error) {
    if (!(error instanceof ConnectionLost)) setTimeout(() => loadInitial(room), 2000);
  } finally {
    room.loadingOlder = false;
    renderHistoryTop();
    fillViewport(room);
  }
}

async function loadOlder(room) {
  if (room.loadingOlder || !room.hasOlder || !room.initialLoaded || !conn || !conn.online) return;
  const before = room.minSeq;
  if (before <= 1) {
    room.hasOlder = false;
    renderHistoryTop();
    return;
  }
  room.loadingOlder = true;
  renderHistoryTop();
  try {
    const page = await conn.request({ type: 'history', room: room.name, before, limit: PAGE_SIZE });
    const messages = page.messages || [];
    room.hasOlder = Boolean(page.has_more) && messages.length > 0;
    insertMessages(room, messages, 'older');
  } catch {
    // Offline or refused: the button stays, and the next scroll tries again.
  } finally {
    room.loadingOlder = false;
    renderHistoryTop();
    fillViewport(room);
  }
}

/** While the messages do not fill the screen, scrolling can't reach the top: load more. */
function fillViewport(room) {
  if (room.name !== current || !room.hasOlder) return;
  const box = ui.messages;
  if (box.scrollHeight <= box.clientHeight + NEAR_TOP_PX) loadOlder(room);
}

// ---------------------------------------------------------------------------------------
// Messages

function normalise(raw, roomName) {
  if (!raw || !Number.isInteger(raw.seq) || raw.seq < 1) return null;
  return {
    room: roomName,
    seq: raw.seq,
    from: typeof raw.from === 'string' ? raw.from : '?',
    body: typeof raw.body === 'string' ? raw.body : '',
    ts: Number.isFinite(raw.ts) ? raw.ts : Date.now(),
    client_id: typeof raw.client_id === 'string' ? raw.client_id : null,
  };
}

function formatTime(ts) {
  const date = new Date(ts);
  const now = new Date();
  const sameDay = date.toDateString() === now.toDateString();
  return sameDay
    ? date.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' })
    : date.toLocaleString([], { month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit' });
}

function renderMessage(message) {
  const item = node('li', message.from === me ? 'message own' : 'message');
  item.dataset.seq = String(message.seq);
  item.dataset.author = message.from;
  item.dataset.ts = String(message.ts);
  const meta = node('div', 'meta');
  meta.append(node('span', 'author', message.from));
  const time = node('time', 'time', formatTime(message.ts));
  const date = new Date(message.ts);
  time.dateTime = date.toISOString();
  time.title = date.toLocaleString();
  meta.append(time);
  item.append(meta, node('div', 'body', message.body));
  return item;
}

/** Marks a message as a continuation when the one before it is by the same author, soon before. */
function regroup(list, index) {
  for (const i of [index, index + 1]) {
    const item = list.children[i];
    if (!item) continue;
    const previous = list.children[i - 1];
    const continued =
      previous !== undefined &&
      previous.dataset.author === item.dataset.author &&
      Number(item.dataset.ts) - Number(previous.dataset.ts) < GROUP_WITHIN_MS;
    item.classList.toggle('cont', continued);
  }
}

function isNearBottom() {
  const box = ui.messages;
  return box.scrollHeight - box.scrollTop - box.clientHeight < NEAR_BOTTOM_PX;
}

function scrollToBottom() {
  ui.messages.scrollTop = ui.messages.scrollHeight;
}

/**
 * Adds committed messages to a room, each seq once, in seq order. `source` is 'live'
 * (events and resume backlog), 'initial' (the newest page) or 'older' (scroll-back).
 */
function insertMessages(room, rawMessages, source) {
  const view = room.view;
  const onScreen = room.name === current;
  const box = ui.messages;
  const wasAtBottom = onScreen && isNearBottom();
  const fromBottom = box.scrollHeight - box.scrollTop;
  const previousMax = room.maxSeq;
  let added = 0;
  let fresh = 0;
  let ownFresh = false;
  for (const raw of rawMessages) {
    const message = normalise(raw, room.name);
    if (!message) continue;
    const index = room.add(message);
    if (index < 0) continue;
    added += 1;
    view.list.insertBefore(renderMessage(message), view.list.children[index] || null);
    regroup(view.list, index);
    settlePending(room, message);
    if (source === 'live' && message.seq > previousMax) {
      stopTyping(room, message.from);
      if (message.from === me) ownFresh = true;
      else fresh += 1;
    }
  }
  if (!added) return;
  if (source === 'live') keepRecent(room, onScreen && !wasAtBottom);
  if (onScreen) {
    if (source === 'older') {
      box.scrollTop = box.scrollHeight - fromBottom; // keep the same message in view
    } else if (source === 'initial' || wasAtBottom || ownFresh) {
      scrollToBottom();
    } else if (fresh) {
      view.newCount += fresh;
      renderNewMessages();
    }
    renderHistoryTop();
  } else if (fresh) {
    room.unread += fresh;
    renderRoomList();
  }
}

/**
 * A long session in a busy room must not grow without bound: past MAX_KEPT_PER_ROOM, the
 * oldest messages go (scrolling back reads them again). Not while the reader is scrolled up,
 * where they may be what is on screen; the next live message at the bottom trims then.
 */
function keepRecent(room, readingOlder) {
  if (readingOlder) return;
  const dropped = room.dropOldest(MAX_KEPT_PER_ROOM);
  if (!dropped) return;
  const list = room.view.list;
  for (let i = 0; i < dropped && list.firstElementChild; i++) list.firstElementChild.remove();
  regroup(list, 0);
}

function renderNewMessages() {
  const room = rooms.get(current);
  const count = room ? room.view.newCount : 0;
  ui.newMessages.hidden = count === 0;
  ui.newMessages.textContent = count === 1 ? '1 new message ↓' : `${count} new messages ↓`;
}

ui.newMessages.addEventListener('click', () => {
  scrollToBottom();
  const room = rooms.get(current);
  if (room) room.view.newCount = 0;
  renderNewMessages();
  ui.composer.focus();
});

ui.messages.addEventListener(
  'scroll',
  () => {
    const room = rooms.get(current);
    if (!room) return;
    if (ui.messages.scrollTop < NEAR_TOP_PX) loadOlder(room);
    if (room.view.newCount && isNearBottom()) {
      room.view.newCount = 0;
      renderNewMessages();
    }
  },
  { passive: true },
);

ui.loadOlder.addEventListener('click', () => {
  const room = rooms.get(current);
  if (room) loadOlder(room);
});

function renderHistoryTop() {
  const room = rooms.get(current);
  if (!room) {
    ui.loadOlder.hidden = true;
    ui.historyStart.hidden = true;
    return;
  }
  const loading = room.loadingOlder;
  ui.loadOlder.hidden = !(loading || (room.initialLoaded && room.hasOlder));
  ui.loadOlder.disabled = loading;
  ui.loadOlder.textContent = loading ? 'Loading…' : 'Load older messages';
  ui.historyStart.hidden = !(room.initialLoaded && !room.hasOlder && !loading);
  ui.historyStart.textContent = room.seqs.length
    ? 'This is the beginning of the conversation.'
    : 'No messages yet. Say hello!';
}

// ---------------------------------------------------------------------------------------
// Sending: every message gets its client_id once, when the user presses send, and keeps it
// through every retry, so the server stores it once however often it is sent.

function renderPendingStatus(item) {
  if (!item.view) return;
  const online = conn && conn.online;
  item.view.classList.toggle('failed', item.state === 'failed');
  item.status.textContent =
    item.state === 'failed'
      ? `Not sent: ${item.error}`
      : online && item.state === 'sending'
        ? 'Sending…'
        : online
          ? 'Queued'
          : 'Waiting for connection…';
  item.retry.hidden = item.state !== 'failed';
  item.discard.hidden = item.state !== 'failed';
}

function renderPending(item) {
  const view = node('li', 'message own pending');
  view.dataset.clientId = item.clientId;
  const meta = node('div', 'meta');
  meta.append(node('span', 'author', me));
  item.status = node('span', 'status');
  meta.append(item.status);
  item.retry = node('button', 'link', 'Retry');
  item.retry.type = 'button';
  item.retry.addEventListener('click', () => {
    item.state = 'queued';
    renderPendingStatus(item);
    const room = rooms.get(item.room);
    if (room) flushOutbox(room);
  });
  item.discard = node('button', 'link', 'Discard');
  item.discard.type = 'button';
  item.discard.addEventListener('click', () => dropPending(item));
  meta.append(item.retry, item.discard);
  view.append(meta, node('div', 'body', item.body));
  item.view = view;
  renderPendingStatus(item);
  return view;
}

function dropPending(item) {
  outbox = outbox.filter((other) => other !== item);
  if (item.view) item.view.remove();
  item.view = null;
}

/** A committed message of ours that is still shown as pending: it is no longer pending. */
function settlePending(room, message) {
  if (message.from !== me || !message.client_id) return;
  const item = outbox.find((i) => i.room === room.name && i.clientId === message.client_id);
  if (!item) return;
  item.committedSeq = message.seq;
  if (item.view) item.view.remove();
  item.view = null;
  if (item.state !== 'sending') dropPending(item);
}

function confirmSent(item, room, sent) {
  dropPending(item);
  if (Number.isInteger(sent.seq) && !room.has(sent.seq)) {
    insertMessages(
      room,
      [{ seq: sent.seq, from: me, body: item.body, ts: sent.ts, client_id: item.clientId }],
      'live',
    );
  }
}

async function flushOutbox(room) {
  if (room.flushing) return;
  room.flushing = true;
  try {
    for (;;) {
      if (!conn || !conn.online || room.joinedOn !== conn.generation || rooms.get(room.name) !== room) break;
      const item = outbox.find((i) => i.room === room.name && i.state === 'queued');
      if (!item) break;
      if (item.committedSeq) {
        dropPending(item);
        continue;
      }
      item.state = 'sending';
      renderPendingStatus(item);
      try {
        const sent = await conn.request({ type: 'send', room: room.name, body: item.body, client_id: item.clientId });
        confirmSent(item, room, sent);
      } catch (error) {
        if (error instanceof ConnectionLost) {
          item.state = 'queued';
          renderPendingStatus(item);
          break;
        }
        if (error.code === 'not_joined') {
          item.state = 'queued';
          renderPendingStatus(item);
          room.joinedOn = 0;
          joinRoom(room);
          break;
        }
        // Worth trying again shortly; but a server error that repeats is not going away, and
        // must not hold back the room's later messages for ever.
        item.errors = (item.errors || 0) + 1;
        const transient = ['rate_limited', 'unavailable'].includes(error.code);
        if (transient || (error.code === 'internal' && item.errors < 3)) {
          item.state = 'queued';
          renderPendingStatus(item);
          setTimeout(() => flushOutbox(room), 1000);
          break;
        }
        item.state = 'failed'; // too_large, bad_request: sending again would not help
        item.error = error.message;
        renderPendingStatus(item);
      }
    }
  } finally {
    room.flushing = false;
  }
}

ui.composerForm.addEventListener('submit', (event) => {
  event.preventDefault();
  const room = rooms.get(current);
  const body = ui.composer.value;
  if (!room || !body.trim()) return;
  if ([...body].length > MAX_BODY_CHARS) {
    ui.typing.textContent = `A message can have at most ${MAX_BODY_CHARS} characters.`;
    return;
  }
  const item = { room: room.name, body, clientId: uuid(), state: 'queued', committedSeq: null, view: null };
  outbox.push(item);
  room.view.pending.append(renderPending(item));
  ui.composer.value = '';
  // The others drop our typing notice when the message arrives: the next keystroke says it again.
  room.view.lastTypingSent = 0;
  autosize();
  scrollToBottom();
  flushOutbox(room);
});

ui.composer.addEventListener('keydown', (event) => {
  if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.composerForm.requestSubmit();
  }
});

ui.composer.addEventListener('input', () => {
  autosize();
  const room = rooms.get(current);
  if (!room || !conn || !ui.composer.value.trim()) return;
  const now = Date.now();
  if (room.joinedOn === conn.generation && now - room.view.lastTypingSent >= TYPING_SEND_EVERY_MS) {
    if (conn.notify({ type: 'typing', room: room.name })) room.view.lastTypingSent = now;
  }
});

function autosize() {
  ui.composer.style.height = 'auto';
  ui.composer.style.height = `${Math.min(ui.composer.scrollHeight, 160)}px`;
}

// ---------------------------------------------------------------------------------------
// Rendering of the chrome around the messages

function setCurrent(name) {
  const room = rooms.get(name);
  if (!room) return;
  const previous = rooms.get(current);
  if (previous && previous !== room) {
    previous.view.scrollTop = ui.messages.scrollTop;
    previous.view.atBottom = isNearBottom();
  }
  current = name;
  room.unread = 0;
  ui.messageLists.replaceChildren(room.view.list, room.view.pending);
  saveOpenRooms();
  renderConversation();
  if (room.view.atBottom) scrollToBottom();
  else ui.messages.scrollTop = room.view.scrollTop;
  fillViewport(room);
}

function renderConversation() {
  const room = rooms.get(current);
  ui.emptyState.hidden = Boolean(room);
  ui.messageLists.hidden = !room;
  ui.roomTitle.textContent = room ? displayName(room.name, me) : 'No room open';
  ui.leaveRoom.hidden = !room;
  ui.leaveLabel.textContent = 'Leave';
  ui.leaveRoom.classList.remove('armed');
  ui.leaveRoom.title = room ? `Leave ${displayName(room.name, me)}: stop receiving its messages` : '';
  leaveArmedFor = null;
  if (!room) ui.messageLists.replaceChildren();
  renderRoomList();
  renderPeople();
  renderTyping();
  renderHistoryTop();
  renderNewMessages();
  renderComposer();
}

function renderComposer() {
  const room = rooms.get(current);
  ui.composer.disabled = !room;
  ui.sendButton.disabled = !room;
  ui.composer.placeholder = room ? `Message ${displayName(room.name, me)}` : 'Open a room to write';
}

/** Public rooms first, then direct conversations, each by name. */
function byListOrder(a, b) {
  const da = a.startsWith('dm:') ? 1 : 0;
  const db = b.startsWith('dm:') ? 1 : 0;
  return da - db || (a < b ? -1 : a > b ? 1 : 0);
}

function renderRoomList() {
  const names = new Set([...listed.keys(), ...rooms.keys()]);
  const sorted = [...names].sort(byListOrder);
  const items = sorted.map((name) => {
    const room = rooms.get(name);
    const item = node('li');
    const button = node('button', 'room-button');
    button.type = 'button';
    button.dataset.room = name;
    if (name === current) button.setAttribute('aria-current', 'true');
    const isDirect = directPeer(name, me) !== null;
    button.append(node('span', isDirect ? 'room-icon dm' : 'room-icon', isDirect ? '@' : '#'));
    button.append(node('span', 'room-name', displayName(name, me).slice(1)));
    if (room && room.unread > 0) {
      const badge = node('span', 'badge', String(room.unread));
      badge.setAttribute('aria-label', `${room.unread} unread`);
      button.append(badge);
    }
    button.addEventListener('click', () => {
      ui.sidebarError.textContent = '';
      openRoom(name);
      closeDrawers();
      if (!narrow.matches) ui.composer.focus();
    });
    item.append(button);
    return item;
  });
  const focusedRoom = document.activeElement && document.activeElement.dataset ? document.activeElement.dataset.room : undefined;
  ui.roomList.replaceChildren(...items);
  if (focusedRoom) {
    const again = [...ui.roomList.querySelectorAll('button')].find((b) => b.dataset.room === focusedRoom);
    if (again) again.focus();
  }
  ui.roomListEmpty.hidden = items.length > 0;
  const unread = [...rooms.values()].reduce((sum, room) => sum + room.unread, 0);
  const title = current ? `${displayName(current, me)} · Chat` : 'Chat';
  document.title = unread ? `(${unread}) ${title}` : title;
}

function renderPeople() {
  const room = rooms.get(current);
  const users = room ? [...room.online].sort() : [];
  ui.online.replaceChildren(
    ...users.map((user) => {
      const item = node('li', user === me ? 'person self' : 'person');
      item.dataset.user = user;
      item.append(node('span', 'avatar', user.slice(0, 1).toUpperCase()));
      item.append(node('span', 'person-name', user));
      if (user === me) item.append(node('span', 'muted you', '(you)'));
      return item;
    }),
  );
  ui.onlineCount.textContent = String(users.length);
  ui.peopleCount.textContent = String(users.length);
}

function renderTyping() {
  const room = rooms.get(current);
  const users = room ? [...room.typing.keys()].sort() : [];
  let text = '';
  if (users.length === 1) text = `${users[0]} is typing…`;
  else if (users.length === 2) text = `${users[0]} and ${users[1]} are typing…`;
  else if (users.length > 2) text = `${users[0]}, ${users[1]} and ${users.length - 2} more are typing…`;
  ui.typing.textContent = text;
}

// ---------------------------------------------------------------------------------------
// Join / direct message boxes

ui.joinForm.addEventListener('submit', (event) => {
  event.preventDefault();
  const name = ui.joinInput.value.trim().toLowerCase().replace(/^#/, '');
  if (!PUBLIC_ROOM.test(name)) {
    ui.sidebarError.textContent =
      'A room name has 1–64 characters: a–z, 0–9, _ and -, and starts with a letter or digit.';
    ui.joinInput.focus();
    return;
  }
  ui.sidebarError.textContent = '';
  ui.joinInput.value = '';
  openRoom(name);
  closeDrawers();
  if (!narrow.matches) ui.composer.focus();
});

ui.dmForm.addEventListener('submit', (event) => {
  event.preventDefault();
  const other = ui.dmInput.value.trim().toLowerCase().replace(/^@/, '');
  if (!USERNAME.test(other)) {
    ui.sidebarError.textContent = 'A username has 3–32 characters: a–z, 0–9 and _.';
    ui.dmInput.focus();
    return;
  }
  if (other === me) {
    ui.sidebarError.textContent = 'That is you: pick someone else to message.';
    ui.dmInput.focus();
    return;
  }
  ui.sidebarError.textContent = '';
  ui.dmInput.value = '';
  openRoom(directRoom(me, other));
  closeDrawers();
  if (!narrow.matches) ui.composer.focus();
});

// ---------------------------------------------------------------------------------------
// Drawers at phone width

function closeDrawers() {
  ui.chatView.classList.remove('sidebar-open', 'people-open');
  ui.roomsToggle.setAttribute('aria-expanded', 'false');
  ui.peopleToggle.setAttribute('aria-expanded', 'false');
  ui.scrim.hidden = true;
}

function toggleDrawer(className, button) {
  const open = !ui.chatView.classList.contains(className);
  closeDrawers();
  if (!open) return;
  ui.chatView.classList.add(className);
  button.setAttribute('aria-expanded', 'true');
  ui.scrim.hidden = false;
  const first = (className === 'sidebar-open' ? $('sidebar') : $('people')).querySelector('input, button, li');
  if (first && first.focus) first.focus();
}

ui.roomsToggle.addEventListener('click', () => toggleDrawer('sidebar-open', ui.roomsToggle));
ui.peopleToggle.addEventListener('click', () => toggleDrawer('people-open', ui.peopleToggle));
ui.scrim.addEventListener('click', closeDrawers);
document.addEventListener('keydown', (event) => {
  if (event.key === 'Escape' && ui.chatView.matches('.sidebar-open, .people-open')) {
    closeDrawers();
    ui.composer.focus();
  }
});

// ---------------------------------------------------------------------------------------

if (store.token() && store.user()) enterChat();
else showAuth();
