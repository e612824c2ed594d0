// The web client in a real browser (Debian's chromium) against a real cluster: two gateways
// behind the project's nginx config, Redis and Postgres (target/debug/chat-cluster).
// Everything goes through nginx's one origin: the page, the API and the WebSocket.
//
// Run with scripts/test-browser (or `node --test tests/browser/` after building).

import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import {
  Cluster,
  artifacts,
  assertStrictlyIncreasing,
  ensureArtifacts,
  gatewayOf,
  joinRoom,
  launchBrowser,
  openUser,
  say,
  sendMany,
  shownMessages,
  signIn,
  waitForMessage,
  waitOnline,
} from './helpers.mjs';

const PASSWORD = 'correct horse battery';
const HELLO = 'Hi Bob! Are you on the new cluster yet?';

describe('web client on a two-gateway cluster', { timeout: 150000 }, () => {
  let cluster;
  let browser;
  const users = []; // every {context, page, problems} opened, checked at the end
  // Every run has a fresh cluster (its own Postgres), so plain names are free.
  const alice = 'alice';
  const bob = 'bob';
  const room = 'general';
  let a; // alice's window
  let b; // bob's window

  async function open(options) {
    const user = await openUser(browser, cluster.url, options);
    users.push(user);
    return user;
  }

  before(async () => {
    ensureArtifacts();
    [cluster, browser] = await Promise.all([Cluster.up(2), launchBrowser()]);
  });

  after(async () => {
    try {
      if (browser) await browser.close();
    } finally {
      if (cluster) await cluster.down();
    }
  });

  test('two users on different gateways chat through nginx', async () => {
    a = await open();
    await a.page.locator('#login-form').waitFor();
    await a.page.screenshot({ path: join(artifacts, 'login.png') });

    // The API's own error message is shown.
    await a.page.locator('#username').fill(alice);
    await a.page.locator('#password').fill(PASSWORD);
    await a.page.locator('#login-button').click();
    await a.page.locator('#auth-error', { hasText: 'invalid username or password' }).waitFor();

    await signIn(a.page, alice, PASSWORD);
    const gatewayA = await gatewayOf(a.page);
    assert.deepEqual(
      await a.page.evaluate(() => [localStorage.getItem('chat.user'), Boolean(localStorage.getItem('chat.token'))]),
      [alice, true],
    );
    await joinRoom(a.page, room);

    b = await open();
    await signIn(b.page, bob, PASSWORD);
    // nginx's least_conn sends the second socket to the gateway that holds none; if a
    // closing socket skewed the counts, reconnect (a reload) until they differ.
    let gatewayB = await gatewayOf(b.page);
    for (let tries = 0; gatewayB === gatewayA && tries < 10; tries += 1) {
      await b.page.reload();
      gatewayB = await waitOnline(b.page);
    }
    assert.notEqual(gatewayB, gatewayA, 'the two users are on different gateways');
    await joinRoom(b.page, room);

    // Each sees the other online (joined.online, then a presence event).
    await a.page.locator(`#online [data-user="${bob}"]`).waitFor();
    await b.page.locator(`#online [data-user="${alice}"]`).waitFor();

    // Typing shows on the other side.
    await b.page.locator('#composer').pressSequentially('hi al', { delay: 20 });
    await a.page.locator('#typing', { hasText: `${bob} is typing…` }).waitFor();

    await say(a.page, HELLO);
    await waitForMessage(b.page, HELLO);
    await b.page.locator('#composer').fill('');
    await say(b.page, 'Yes! Just logged in. I am on the other gateway.');
    await waitForMessage(a.page, 'Yes! Just logged in. I am on the other gateway.');
    await say(a.page, 'Two gateways, one conversation.');
    await waitForMessage(b.page, 'Two gateways, one conversation.');
    // The typing notice goes once bob's message arrives.
    assert.equal(await a.page.locator('#typing').textContent(), '');

    for (const [page, me, other] of [
      [a.page, alice, bob],
      [b.page, bob, alice],
    ]) {
      const shown = await shownMessages(page);
      assert.equal(shown.length, 3);
      assert.deepEqual(
        shown.map((m) => m.author),
        [alice, bob, alice],
      );
      for (const m of shown) {
        assert.equal(m.own, m.author === me, `own marks ${me}'s messages only`);
        assert.match(m.time, /\d/, 'each message shows a time');
      }
      assert.ok(shown.some((m) => m.author === other));
    }
    await a.page.screenshot({ path: join(artifacts, 'conversation.png') });
  });

  test("a gateway crash: both keep chatting, every message once and in order", async () => {
    assert.ok(a && b, 'needs the previous test');
    const gatewayA = await gatewayOf(a.page);
    const before = await cluster.status();
    const index = before.gateways.findIndex((g) => g.id === gatewayA);
    assert.ok(index >= 0, `${gatewayA} is in ${JSON.stringify(before.gateways)}`);

    await cluster.kill(index);

    // Her window notices the drop. She types and sends while it reconnects: the message is
    // queued. (The check of the state and the send happen in one step in the page.)
    await a.page.waitForFunction(() => document.querySelector('#connection').dataset.state !== 'online');
    await a.page.locator('#composer').fill('typed while offline');
    const queued = await a.page.evaluate(() => {
      const state = document.querySelector('#connection').dataset.state;
      document.querySelector('#composer-form').requestSubmit();
      const pending = [...document.querySelectorAll('#messages .pending .body')].map((el) => el.textContent);
      return { state, pending };
    });
    assert.notEqual(queued.state, 'online');
    assert.deepEqual(queued.pending, ['typed while offline'], 'shown as pending while offline');

    // Bob, on the surviving gateway, keeps talking meanwhile.
    const fromBob = ['are you there?', 'your gateway crashed', 'anyway, lunch at noon?'];
    for (const text of fromBob) await say(b.page, text);

    // Alice reconnects on her own, to the other gateway, and resumes.
    const newGateway = await waitOnline(a.page, { notGateway: gatewayA });
    assert.notEqual(newGateway, gatewayA);
    await say(a.page, 'back again');
    await say(b.page, 'welcome back');

    const expected = [
      HELLO,
      'typed while offline',
      ...fromBob,
      'back again',
      'welcome back',
    ];
    for (const page of [a.page, b.page]) {
      for (const text of expected) await waitForMessage(page, text);
      await page.locator('#messages .pending').waitFor({ state: 'detached' });
    }
    const seqsA = (await shownMessages(a.page)).map((m) => m.seq);
    const seqsB = (await shownMessages(b.page)).map((m) => m.seq);
    for (const [who, seqs] of [
      [alice, seqsA],
      [bob, seqsB],
    ]) {
      assertStrictlyIncreasing(assert, seqs, who);
      assert.equal(new Set(seqs).size, seqs.length, `${who}: no duplicates`);
      assert.deepEqual(
        seqs,
        Array.from({ length: seqs.length }, (_, i) => i + 1),
        `${who} holds every seq`,
      );
    }
    assert.deepEqual(seqsA, seqsB, 'both windows show the same messages');
    for (const page of [a.page, b.page]) {
      const bodies = (await shownMessages(page)).map((m) => m.body);
      for (const text of expected) {
        assert.equal(bodies.filter((body) => body === text).length, 1, `"${text}" shown once`);
      }
    }
    await b.page.screenshot({ path: join(artifacts, 'after-reconnect.png') });
  });

  test('a message with HTML shows as literal text', async () => {
    assert.ok(a && b, 'needs the first test');
    const evil = '<img src=x onerror=alert(1)>';
    await say(a.page, evil);
    for (const page of [a.page, b.page]) {
      await waitForMessage(page, evil);
      assert.equal(await page.locator('#messages img').count(), 0, 'no img element in #messages');
    }
    for (const user of users) assert.deepEqual(user.problems.dialogs, [], 'no dialog opened');
  });

  test('a direct conversation, and a clear error for a user who does not exist', async () => {
    assert.ok(a && b, 'needs the first test');
    await a.page.locator('#dm-input').fill('nobody');
    await a.page.locator('#dm-button').click();
    await a.page.locator('#sidebar-error', { hasText: `There is no user named “nobody”` }).waitFor();

    await a.page.locator('#dm-input').fill(bob);
    await a.page.locator('#dm-input').press('Enter');
    await a.page.waitForFunction((t) => document.querySelector('#room-title').textContent === t, `@${bob}`);
    await say(a.page, 'psst, just between us');
    await waitForMessage(a.page, 'psst, just between us');

    // Bob finds it in his room list (GET /api/rooms lists his direct rooms), named after Alice.
    const dmRoom = alice < bob ? `dm:${alice}:${bob}` : `dm:${bob}:${alice}`;
    await b.page.reload();
    await waitOnline(b.page);
    const entry = b.page.locator(`#room-list [data-room="${dmRoom}"]`);
    await entry.waitFor();
    assert.equal((await entry.textContent()).includes(alice), true);
    await entry.click();
    await waitForMessage(b.page, 'psst, just between us');

    // Alice goes back to #general and writes: Bob, still in the direct room, sees an unread
    // badge on #general; opening it shows the message and clears the badge.
    await a.page.locator(`#room-list [data-room="${room}"]`).click();
    await waitForMessage(a.page, 'welcome back');
    await say(a.page, 'Back in #general: the crash test went fine.');
    const general = b.page.locator(`#room-list [data-room="${room}"]`);
    await general.locator('.badge', { hasText: '1' }).waitFor();
    await general.click();
    await waitForMessage(b.page, 'Back in #general: the crash test went fine.');
    await general.locator('.badge').waitFor({ state: 'detached' });

    await a.page.locator('#composer').pressSequentially('Next: ', { delay: 20 });
    await b.page.locator('#typing', { hasText: `${alice} is typing…` }).waitFor();
    await b.page.screenshot({ path: join(artifacts, 'conversation-typing.png'), animations: 'disabled' });
    await a.page.locator('#composer').fill('');
  });

  test('a draining gateway (close 1012): the client moves to another and resumes', async () => {
    assert.ok(a && b, 'needs the first test');
    const before = (await cluster.status()).gateways.map((g) => g.id);
    const scaled = JSON.parse(await cluster.command('scale', String(before.length + 1)));
    const added = scaled.gateways.map((g) => g.id).find((id) => !before.includes(id));
    assert.ok(added, 'a gateway was added');

    // Bob reconnects (a reload) until nginx puts him on the new, empty gateway.
    let gateway = await gatewayOf(b.page);
    for (let tries = 0; gateway !== added && tries < 10; tries += 1) {
      await b.page.reload();
      gateway = await waitOnline(b.page);
    }
    assert.equal(gateway, added, 'bob is on the added gateway');
    await waitForMessage(b.page, 'Back in #general: the crash test went fine.');

    // Scaling back down drains the newest gateway (SIGTERM): its sockets close with 1012.
    const draining = cluster.command('scale', String(before.length));
    await say(a.page, 'Deploy in progress, hold on.');
    await waitOnline(b.page, { notGateway: added });
    assert.equal(await b.page.locator('#connection').getAttribute('data-close-code'), '1012');
    await draining;
    await say(b.page, 'Still here after the drain.');
    for (const page of [a.page, b.page]) {
      await waitForMessage(page, 'Deploy in progress, hold on.');
      await waitForMessage(page, 'Still here after the drain.');
    }
    const seqsA = (await shownMessages(a.page)).map((m) => m.seq);
    const seqsB = (await shownMessages(b.page)).map((m) => m.seq);
    assert.deepEqual(seqsB, seqsA);
    assert.deepEqual(
      seqsA,
      Array.from({ length: seqsA.length }, (_, i) => i + 1),
    );
  });

  test('leaving a room: the others see it, a reload does not reopen it, unsent text is not lost on one click', async () => {
    const frank = 'frank';
    const grace = 'grace';
    const f = await open();
    // Frank's socket goes through the browser's WebSocket route, so that the test can hold
    // his `send` frames back (then his message stays unsent) while everything else passes.
    let holdSends = false;
    await f.page.routeWebSocket(/\/ws$/, (ws) => {
      const server = ws.connectToServer();
      ws.onMessage((message) => {
        if (holdSends && JSON.parse(message).type === 'send') return;
        server.send(message);
      });
    });
    await signIn(f.page, frank, PASSWORD);
    await joinRoom(f.page, 'lobby');
    await joinRoom(f.page, 'side');
    const g = await open();
    await signIn(g.page, grace, PASSWORD);
    await joinRoom(g.page, 'side');
    await g.page.locator(`#online [data-user="${frank}"]`).waitFor();

    // A message still on its way: the first click warns and stays, the second one leaves.
    holdSends = true;
    await say(f.page, 'this one never leaves the browser');
    await f.page.locator('#messages .pending-list li').waitFor();
    await f.page.locator('#leave-room').click();
    await f.page.locator('#typing', { hasText: '1 message is not sent yet' }).waitFor();
    assert.equal(await f.page.locator('#leave-room .label').textContent(), 'Leave anyway');
    assert.equal(await f.page.locator('#room-title').textContent(), '#side', 'still in the room');
    await f.page.locator('#leave-room').click();
    await f.page.waitForFunction(() => document.querySelector('#room-title').textContent === '#lobby');
    assert.equal(await f.page.locator('#leave-room .label').textContent(), 'Leave');
    holdSends = false;

    // Grace sees him go; #side stays in his list, closed, and a reload does not reopen it.
    await g.page.locator(`#online [data-user="${frank}"]`).waitFor({ state: 'detached' });
    await say(g.page, 'frank, you missed this');
    await waitForMessage(g.page, 'frank, you missed this');
    assert.deepEqual(
      await f.page.evaluate((u) => JSON.parse(localStorage.getItem(`chat.rooms.${u}`)).open, frank),
      ['lobby'],
    );
    await f.page.reload();
    await waitOnline(f.page);
    await f.page.waitForFunction(() => document.querySelector('#room-title').textContent === '#lobby');
    const side = f.page.locator('#room-list [data-room="side"]');
    await side.waitFor();
    assert.equal(await side.getAttribute('aria-current'), null);

    // Opening it again shows what he missed, and Grace sees him back; the held message was
    // discarded, not sent late.
    await side.click();
    await waitForMessage(f.page, 'frank, you missed this');
    await g.page.locator(`#online [data-user="${frank}"]`).waitFor();
    assert.deepEqual(
      (await shownMessages(f.page)).map((m) => m.body),
      ['frank, you missed this'],
    );

    // Leaving the last open room leaves nothing on screen, and the join box focused.
    await f.page.locator('#leave-room').click();
    await f.page.waitForFunction(() => document.querySelector('#room-title').textContent === '#lobby');
    await f.page.locator('#leave-room').click();
    await f.page.locator('#empty-state').waitFor();
    assert.equal(await f.page.locator('#leave-room').isVisible(), false);
    assert.equal(await f.page.evaluate(() => document.activeElement.id), 'join-room-input');
  });

  test('scroll-back loads older history page by page, down to seq 1', async () => {
    const carol = 'carol';
    const dave = 'dave';
    const history = 'history';
    const c = await open();
    await signIn(c.page, carol, PASSWORD);
    const bodies = Array.from({ length: 120 }, (_, i) => `history message ${i + 1}`);
    const seqs = await sendMany(c.page, history, bodies);
    assert.deepEqual(seqs, Array.from({ length: 120 }, (_, i) => i + 1));

    const d = await open();
    await signIn(d.page, dave, PASSWORD);
    await joinRoom(d.page, history);
    await waitForMessage(d.page, 'history message 120');
    // Only the newest page (50) at first, scrolled to the bottom.
    let shown = await shownMessages(d.page);
    assert.deepEqual(
      shown.map((m) => m.seq),
      Array.from({ length: 50 }, (_, i) => 71 + i),
    );
    await d.page.locator('#load-older').waitFor();

    // Scrolling to the top loads one more page each time.
    for (const expected of [100, 120]) {
      await d.page.locator('#messages').hover();
      await d.page.mouse.wheel(0, -100000);
      await d.page.waitForFunction(
        (n) => document.querySelectorAll('#messages [data-seq]').length === n,
        expected,
      );
    }
    shown = await shownMessages(d.page);
    const all = shown.map((m) => m.seq);
    assert.deepEqual(all, Array.from({ length: 120 }, (_, i) => i + 1), 'seq 1 to 120, once each, in order');
    assert.deepEqual(
      shown.map((m) => m.body),
      bodies,
    );
    await d.page.locator('#history-start', { hasText: 'beginning of the conversation' }).waitFor();
    await d.page.screenshot({ path: join(artifacts, 'scroll-back.png') });

    // New messages while scrolled up: a marker, not a jump.
    await sendMany(c.page, history, ['a new one while dave reads old ones']);
    await d.page.locator('#new-messages', { hasText: '1 new message' }).waitFor();
    await d.page.locator('#new-messages').click();
    await d.page.locator('#new-messages').waitFor({ state: 'hidden' });
    assert.ok(
      await d.page.evaluate(() => {
        const box = document.querySelector('#messages');
        return box.scrollHeight - box.scrollTop - box.clientHeight < 80;
      }),
      'the marker scrolls to the newest message',
    );
  });

  test('keyboard only: register, join a room and send', async () => {
    const k = await open();
    const { page } = k;
    await page.locator('#username').waitFor();
    assert.equal(await page.evaluate(() => document.activeElement.id), 'username', 'the form starts focused');
    await page.keyboard.type('erin');
    await page.keyboard.press('Tab');
    await page.keyboard.type(PASSWORD);
    await page.keyboard.press('Tab'); // Log in
    await page.keyboard.press('Tab'); // Register
    assert.equal(await page.evaluate(() => document.activeElement.id), 'register-button');
    await page.keyboard.press('Enter');
    await waitOnline(page);
    await page.waitForFunction(() => document.activeElement.id === 'join-room-input');
    await page.keyboard.type(room);
    await page.keyboard.press('Enter');
    await page.waitForFunction(() => document.activeElement.id === 'composer');
    await page.keyboard.type('Hello from the keyboard');
    await page.keyboard.press('Enter');
    await waitForMessage(page, 'Hello from the keyboard');
    // Tab reaches the room list's buttons, and focus is visible there.
    await page.locator('#join-room-input').focus();
    for (let i = 0; i < 10 && !(await page.evaluate(() => document.activeElement.matches('#room-list button'))); i += 1) {
      await page.keyboard.press('Tab');
    }
    const outline = await page.evaluate(() => getComputedStyle(document.activeElement).outlineStyle);
    assert.notEqual(outline, 'none', 'the focused room button shows a focus ring');
    await k.context.close();
  });

  test('phone width: the room list collapses into a drawer', async () => {
    const p = await open({ viewport: { width: 390, height: 780 }, isMobile: true, hasTouch: true });
    await p.page.screenshot({ path: join(artifacts, 'phone-login.png') });
    await signIn(p.page, alice, PASSWORD, { register: false });
    assert.equal(await p.page.locator('#sidebar').isVisible(), false, 'room list hidden at phone width');
    await p.page.locator('#rooms-toggle').click();
    await p.page.locator(`#room-list [data-room="${room}"]`).click();
    await p.page.waitForFunction((r) => document.querySelector('#room-title').textContent === `#${r}`, room);
    await p.page.locator('#sidebar').waitFor({ state: 'hidden' });
    await waitForMessage(p.page, 'welcome back');
    const width = await p.page.evaluate(() => document.documentElement.scrollWidth);
    assert.ok(width <= 390, `no horizontal scrolling (${width}px)`);
    await p.page.screenshot({ path: join(artifacts, 'phone-conversation.png'), animations: 'disabled' });
    assert.ok(
      await p.page.evaluate(() => {
        const title = document.querySelector('#room-title');
        return title.scrollWidth <= title.clientWidth;
      }),
      'the room title fits beside the buttons',
    );
    await p.page.locator('#rooms-toggle').click();
    await p.page.locator('#sidebar').waitFor();
    await p.page.screenshot({ path: join(artifacts, 'phone-rooms.png'), animations: 'disabled' });
  });

  test('log out clears the session and shows the login form', async () => {
    assert.ok(a, 'needs the first test');
    await a.page.locator('#logout').click();
    await a.page.locator('#login-form').waitFor();
    assert.deepEqual(
      await a.page.evaluate(() => [localStorage.getItem('chat.token'), localStorage.getItem('chat.user')]),
      [null, null],
    );
    await a.page.reload();
    await a.page.locator('#login-form').waitFor();
    assert.equal(await a.page.locator('#chat-view').isVisible(), false);

    // A token the gateway refuses at hello (unauthorized, close 1008): back to the login form.
    await a.page.evaluate((user) => {
      localStorage.setItem('chat.token', 'not-a-valid-token');
      localStorage.setItem('chat.user', user);
    }, alice);
    await a.page.reload();
    await a.page.locator('#auth-error', { hasText: 'session has expired' }).waitFor();
    assert.equal(await a.page.evaluate(() => localStorage.getItem('chat.token')), null);
  });

  test('no page error and no Content-Security-Policy violation in any window', () => {
    for (const user of users) {
      assert.deepEqual(user.problems.errors, [], 'uncaught errors');
      assert.deepEqual(user.problems.csp, [], 'CSP violations');
      assert.deepEqual(user.problems.dialogs, [], 'dialogs');
    }
  });
});
