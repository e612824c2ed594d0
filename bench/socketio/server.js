// Socket.IO with its Redis adapter: the same room chat as the gateway, for scripts/bench to
// run chat-loadgen against (`--protocol socketio`). One Node process, WebSocket transport only,
// every broadcast through Redis as in a fleet of several. It stores nothing and numbers each
// room's messages in memory, so it does less than the gateway: no database, no durable commit.
// With several processes a room's publishers must all use the same one (the load generator's
// connections alternate over the processes, so a room count that is a multiple of the process
// count does that).
//
//   PORT=8090 REDIS_URL=redis://127.0.0.1:6379 node server.js
//
// Events: "join" {room} -> ack {type: "joined", last_seq}; "send" {room, body, client_id, ref}
// -> broadcast "message" {type, room, seq, from, body, ts, client_id} to the room, then ack
// {type: "sent", ref, seq}. The acks carry the gateway's frame shapes so the load generator reads
// both servers' answers the same way.
"use strict";
const { createServer } = require("http");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");
const { createClient } = require("redis");

async function main() {
  const port = Number(process.env.PORT);
  const redisUrl = process.env.REDIS_URL;
  if (!port || !redisUrl) {
    throw new Error("set PORT and REDIS_URL");
  }
  const pub = createClient({ url: redisUrl });
  const sub = pub.duplicate();
  await Promise.all([pub.connect(), sub.connect()]);

  const http = createServer();
  const io = new Server(http, {
    adapter: createAdapter(pub, sub),
    transports: ["websocket"],
    serveClient: false,
  });
  const lastSeq = new Map();
  io.on("connection", (socket) => {
    socket.on("join", (req, ack) => {
      if (!req || typeof req.room !== "string") return;
      socket.join(req.room);
      if (typeof ack === "function") {
        ack({ type: "joined", ref: req.ref, room: req.room, last_seq: lastSeq.get(req.room) || 0 });
      }
    });
    socket.on("send", (req, ack) => {
      if (!req || typeof req.room !== "string" || typeof req.body !== "string") return;
      const seq = (lastSeq.get(req.room) || 0) + 1;
      lastSeq.set(req.room, seq);
      io.to(req.room).emit("message", {
        type: "message",
        room: req.room,
        seq,
        from: socket.id,
        body: req.body,
        ts: Date.now(),
        client_id: req.client_id,
      });
      if (typeof ack === "function") ack({ type: "sent", ref: req.ref, room: req.room, seq });
    });
  });
  http.listen(port, "127.0.0.1", () => console.log(`listening on 127.0.0.1:${port}`));
  const stop = () => io.close(() => Promise.all([pub.quit(), sub.quit()]).finally(() => process.exit(0)));
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
