// What the client holds for one open room: committed messages by seq (never twice, always
// in seq order), who is online, who is typing. No DOM here.

export const PUBLIC_ROOM = /^[a-z0-9][a-z0-9_-]{0,63}$/;
export const USERNAME = /^[a-z0-9_]{3,32}$/;

/** The direct room of two users: `dm:<a>:<b>` with a < b in byte order. */
export function directRoom(me, other) {
  const [a, b] = me < other ? [me, other] : [other, me];
  return `dm:${a}:${b}`;
}

/** The other user of a direct room, or null for a public room. */
export function directPeer(room, me) {
  const parts = room.split(':');
  if (parts.length !== 3 || parts[0] !== 'dm') return null;
  return parts[1] === me ? parts[2] : parts[1];
}

export function displayName(room, me) {
  const peer = directPeer(room, me);
  return peer === null ? `#${room}` : `@${peer}`;
}

export class Room {
  constructor(name) {
    this.name = name;
    this.seqs = []; // ascending
    this.bySeq = new Map();
    /** `joined.last_seq` of the first join: the resume point while no message is held. */
    this.baseline = null;
    /**
     * The highest seq that arrived as a `message` frame. Those arrive in order with no gap
     * from a join on, so everything up to it is held. A `sent` does not move it: another
     * user's message with a lower seq may still be on its way when our own is acked.
     */
    this.received = 0;
    /** Connection generation on which the join succeeded (0: not joined now). */
    this.joinedOn = 0;
    this.joining = null;
    this.hasOlder = true;
    this.loadingOlder = false;
    this.initialLoaded = false;
    this.online = new Set();
    this.typing = new Map(); // user -> timer
    this.unread = 0;
  }

  get maxSeq() {
    return this.seqs.length ? this.seqs[this.seqs.length - 1] : 0;
  }

  get minSeq() {
    return this.seqs.length ? this.seqs[0] : 0;
  }

  /** The `since` of a resume: the highest seq up to which everything is held. */
  resumeSince() {
    return Math.max(this.received, this.baseline ?? 0);
  }

  /** A `message` frame arrived (held already or not). */
  noteReceived(seq) {
    if (Number.isInteger(seq) && seq > this.received) this.received = seq;
  }

  has(seq) {
    return this.bySeq.has(seq);
  }

  /**
   * Adds a committed message. Returns its index in seq order, or -1 if that seq is held
   * already (a repeat from a resume, a history page, or our own `sent`).
   */
  add(message) {
    const seq = message.seq;
    if (!Number.isInteger(seq) || this.bySeq.has(seq)) return -1;
    this.bySeq.set(seq, message);
    let lo = 0;
    let hi = this.seqs.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (this.seqs[mid] < seq) lo = mid + 1;
      else hi = mid;
    }
    this.seqs.splice(lo, 0, seq);
    return lo;
  }

  /**
   * Forgets the oldest messages beyond `keep` (scroll-back reads them again). Returns how many
   * were forgotten. The resume point does not move: it is about the newest.
   */
  dropOldest(keep) {
    const excess = this.seqs.length - keep;
    if (excess <= 0) return 0;
    for (const seq of this.seqs.splice(0, excess)) this.bySeq.delete(seq);
    this.hasOlder = true;
    return excess;
  }

  /** The seq that follows `seq` among those held, or null. */
  nextSeqAfter(seq) {
    const index = this.seqs.indexOf(seq);
    return index >= 0 && index + 1 < this.seqs.length ? this.seqs[index + 1] : null;
  }

  previousSeqBefore(seq) {
    const index = this.seqs.indexOf(seq);
    return index > 0 ? this.seqs[index - 1] : null;
  }
}
