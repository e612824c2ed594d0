// Shared pieces of the browser tests: the local cluster (target/debug/chat-cluster), Debian's
// chromium driven by playwright-core, and small helpers that act and look like a user.

import { execFile, execFileSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { chromium } from 'playwright-core';

const run = promisify(execFile);

export const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), '../..');
export const artifacts = join(repoRoot, 'target/browser-artifacts');
const clusterBin = join(repoRoot, 'target/debug/chat-cluster');
const gatewayBin = join(repoRoot, 'target/debug/chat-gateway');
export const chromiumPath = process.env.CHROMIUM_PATH || '/usr/bin/chromium';

/** A local fleet: Redis, Postgres, `gateways` gateways and nginx, all on 127.0.0.1. */
export class Cluster {
  static async up(gateways = 2) {
    for (const bin of [clusterBin, gatewayBin]) {
      if (!existsSync(bin)) {
        throw new Error(`${bin} is missing: run \`cargo build -p chat-gateway -p chat-cluster\` (scripts/test-browser does)`);
      }
    }
    const state = mkdtempSync(join(tmpdir(), 'chat-browser-'));
    const cluster = new Cluster(state);
    cluster.registerEmergencyDown();
    try {
      const args = ['--state', state, 'up', '--gateways', String(gateways), '--no-prometheus', '--gateway-bin', gatewayBin];
      // Tests need no crash-safe Postgres: take the faster one where the tool offers it.
      const { stdout: help } = await run(clusterBin, ['up', '--help']);
      if (help.includes('--fast-postgres')) args.push('--fast-postgres');
      const { stdout } = await run(clusterBin, args, { timeout: 180000 });
      // `up` prints the summary JSON, then one line for people ("chat through nginx: ...").
      const end = stdout.lastIndexOf('}');
      cluster.summary = JSON.parse(stdout.slice(stdout.indexOf('{'), end + 1));
    } catch (error) {
      await cluster.down();
      throw error;
    }
    return cluster;
  }

  constructor(state) {
    this.state = state;
    this.summary = null;
    this.stopped = false;
  }

  get url() {
    return this.summary.nginx;
  }

  async command(...args) {
    const { stdout } = await run(clusterBin, ['--state', this.state, ...args], { timeout: 60000 });
    return stdout;
  }

  async status() {
    return JSON.parse(await this.command('status'));
  }

  /** SIGKILLs the gateway at `index` of the status list (a crash). */
  async kill(index) {
    return JSON.parse(await this.command('kill', String(index)));
  }

  async down() {
    if (this.stopped) return;
    this.stopped = true;
    try {
      await run(clusterBin, ['--state', this.state, 'down'], { timeout: 120000 });
    } finally {
      // Keep the fleet's logs with the screenshots, for a look after a failure.
      const logs = join(artifacts, 'cluster-logs');
      rmSync(logs, { recursive: true, force: true });
      mkdirSync(logs, { recursive: true });
      for (const name of readdirSync(this.state)) {
        if (/\.(log|stderr)$/.test(name)) copyFileSync(join(this.state, name), join(logs, name));
      }
      rmSync(this.state, { recursive: true, force: true });
    }
  }

  /** If the test process is interrupted or exits early, the fleet still goes down. */
  registerEmergencyDown() {
    const downNow = () => {
      if (this.stopped) return;
      this.stopped = true;
      try {
        execFileSync(clusterBin, ['--state', this.state, 'down'], { stdio: 'ignore', timeout: 120000 });
        rmSync(this.state, { recursive: true, force: true });
      } catch {
        // nothing more to do on the way out
      }
    };
    process.once('exit', downNow);
    for (const signal of ['SIGINT', 'SIGTERM']) {
      process.once(signal, () => {
        downNow();
        process.exit(130);
      });
    }
  }
}

export async function launchBrowser() {
  if (!existsSync(chromiumPath)) {
    throw new Error(`${chromiumPath} is missing: install Debian's chromium (scripts/test-browser does)`);
  }
  return chromium.launch({
    executablePath: chromiumPath,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
}

export function ensureArtifacts() {
  mkdirSync(artifacts, { recursive: true });
  return artifacts;
}

export function suffix() {
  return Math.random().toString(36).slice(2, 8).padEnd(6, '0');
}

/**
 * A browser context and page for one user, with a record of what went wrong in it: uncaught
 * errors, Content-Security-Policy violations, and any dialog (which no message may open).
 */
export async function openUser(browser, baseUrl, { viewport = { width: 1000, height: 650 }, ...options } = {}) {
  const context = await browser.newContext({ viewport, ...options });
  const page = await context.newPage();
  const problems = { errors: [], csp: [], dialogs: [] };
  page.on('pageerror', (error) => problems.errors.push(String(error)));
  page.on('console', (message) => {
    if (message.type() === 'error' && /Content.Security.Policy/i.test(message.text())) {
      problems.csp.push(message.text());
    }
  });
  page.on('dialog', async (dialog) => {
    problems.dialogs.push(`${dialog.type()}: ${dialog.message()}`);
    await dialog.dismiss().catch(() => {});
  });
  page.setDefaultTimeout(15000);
  await page.goto(baseUrl);
  return { context, page, problems };
}

/** Fills the login form and presses Register (or Log in); waits until the chat is online. */
export async function signIn(page, username, password, { register = true } = {}) {
  await page.locator('#login-form').waitFor();
  await page.locator('#username').fill(username);
  await page.locator('#password').fill(password);
  await page.locator(register ? '#register-button' : '#login-button').click();
  await waitOnline(page);
}

export async function waitOnline(page, { notGateway } = {}) {
  await page.waitForFunction(
    (not) => {
      const el = document.querySelector('#connection');
      return el && el.dataset.state === 'online' && el.dataset.gateway && el.dataset.gateway !== not;
    },
    notGateway ?? null,
    { timeout: 30000 },
  );
  return gatewayOf(page);
}

export function gatewayOf(page) {
  return page.locator('#connection').getAttribute('data-gateway');
}

/** Joins (or creates) a public room with the sidebar's box, as a user would. */
export async function joinRoom(page, room) {
  const drawerToggle = page.locator('#rooms-toggle');
  if (await drawerToggle.isVisible()) await drawerToggle.click();
  await page.locator('#join-room-input').fill(room);
  await page.locator('#join-room-input').press('Enter');
  await page.waitForFunction((r) => document.querySelector('#room-title').textContent === `#${r}`, room);
}

/** Types a message and presses Enter. */
export async function say(page, text) {
  await page.locator('#composer').fill(text);
  await page.locator('#composer').press('Enter');
}

/** Waits until a committed message (one with data-seq) has exactly this body. */
export async function waitForMessage(page, body, timeout = 20000) {
  await page.waitForFunction(
    (text) =>
      [...document.querySelectorAll('#messages [data-seq] .body')].some((el) => el.textContent === text),
    body,
    { timeout },
  );
}

/** The committed messages on screen, in DOM order: [{seq, author, body, own}]. */
export function shownMessages(page) {
  return page.$$eval('#messages [data-seq]', (items) =>
    items.map((item) => ({
      seq: Number(item.dataset.seq),
      author: item.querySelector('.author').textContent,
      body: item.querySelector('.body').textContent,
      own: item.classList.contains('own'),
      time: item.querySelector('.time').textContent,
    })),
  );
}

/**
 * Sends `bodies` to `room` over the page's own origin with throw-away WebSockets (Node 20 has
 * no WebSocket client), as the user logged in on that page. Each socket may burst 20 sends
 * (CHAT_RATE_BURST), so a fresh socket takes over every 20 messages; they are sent one after
 * the other, so seq order is body order. Returns the seqs.
 */
export function sendMany(page, room, bodies) {
  return page.evaluate(
    async ({ room, bodies }) => {
      const token = localStorage.getItem('chat.token');
      const url = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/ws`;
      const connect = () =>
        new Promise((resolve, reject) => {
          const ws = new WebSocket(url);
          const waiting = new Map();
          let nextRef = 0;
          const call = (frame) =>
            new Promise((res, rej) => {
              nextRef += 1;
              waiting.set(nextRef, { res, rej });
              ws.send(JSON.stringify({ ...frame, ref: nextRef }));
            });
          ws.onmessage = (event) => {
            const frame = JSON.parse(event.data);
            const waiter = waiting.get(frame.ref);
            if (!waiter) return;
            waiting.delete(frame.ref);
            if (frame.type === 'error') waiter.rej(Object.assign(new Error(frame.message), { code: frame.code }));
            else waiter.res(frame);
          };
          ws.onerror = () => reject(new Error('socket failed'));
          ws.onopen = () => call({ type: 'hello', token }).then(() => resolve({ ws, call }), reject);
        });
      const batch = crypto.randomUUID();
      const seqs = [];
      let i = 0;
      while (i < bodies.length) {
        const { ws, call } = await connect();
        await call({ type: 'join', room });
        for (let n = 0; n < 20 && i < bodies.length; n += 1, i += 1) {
          for (;;) {
            try {
              const sent = await call({ type: 'send', room, body: bodies[i], client_id: `${batch}-${i}` });
              seqs.push(sent.seq);
              break;
            } catch (error) {
              if (error.code !== 'rate_limited') throw error;
              await new Promise((r) => setTimeout(r, 200));
            }
          }
        }
        ws.close();
      }
      return seqs;
    },
    { room, bodies },
  );
}

export function assertStrictlyIncreasing(assert, seqs, what) {
  for (let i = 1; i < seqs.length; i += 1) {
    assert.ok(seqs[i] > seqs[i - 1], `${what}: seq ${seqs[i]} after ${seqs[i - 1]} (${seqs.join(',')})`);
  }
}
