// The web client's room bookkeeping (no browser needed): what it resumes from after a drop.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Room } from '../../services/chat-gateway/web/js/room.js';

test('an ack of our own message does not move the resume point past messages still on their way', () => {
  const room = new Room('general');
  room.baseline = 40; // joined at last_seq 40
  for (const seq of [41, 42]) {
    room.noteReceived(seq);
    room.add({ seq, from: 'bob', body: 'b' });
  }
  // Our message is acked as seq 44 while bob's 43 is still on its way to us.
  room.add({ seq: 44, from: 'me', body: 'mine' });
  assert.equal(room.resumeSince(), 42, 'a resume must ask again for 43');
  // 43 and our own copy of 44 arrive: everything up to 44 is held.
  room.noteReceived(43);
  room.add({ seq: 43, from: 'bob', body: 'b' });
  room.noteReceived(44);
  assert.equal(room.add({ seq: 44, from: 'me', body: 'mine' }), -1, 'held once');
  assert.equal(room.resumeSince(), 44);
});

test('before any message, a resume starts from the first join', () => {
  const room = new Room('general');
  room.baseline = 7;
  assert.equal(room.resumeSince(), 7);
});

test('a room keeps its newest messages, and knows the older ones can be read again', () => {
  const room = new Room('busy');
  room.baseline = 0;
  room.hasOlder = false;
  for (let seq = 1; seq <= 10; seq += 1) {
    room.noteReceived(seq);
    room.add({ seq, from: 'bob', body: `m${seq}` });
  }
  assert.equal(room.dropOldest(4), 6);
  assert.deepEqual(room.seqs, [7, 8, 9, 10]);
  assert.equal(room.has(6), false);
  assert.equal(room.hasOlder, true, 'scroll-back reads the dropped ones again');
  assert.equal(room.resumeSince(), 10, 'the resume point is about the newest');
  assert.equal(room.dropOldest(4), 0);
});
