//! One small fanout layout, and what a run of it must report whatever server it ran against.

/// 40 receivers and 2 publishers over 2 rooms, 20 msg/s for 2 s.
pub const SMALL_FANOUT: [&str; 12] = [
    "--scenario",
    "fanout",
    "--clients",
    "40",
    "--rooms",
    "2",
    "--publishers",
    "2",
    "--rate",
    "20",
    "--duration",
    "2",
];

/// Checks that a [`SMALL_FANOUT`] run connected everyone and delivered every acked message to
/// every member of its room, once; returns the number of acked messages.
pub fn assert_every_message_delivered(report: &serde_json::Value) -> u64 {
    assert_eq!(report["connections"]["made"], 42);
    assert_eq!(report["connections"]["failed"], 0);
    let acked = report["messages_acked"].as_u64().unwrap();
    assert!(acked >= 20, "{report}");
    // 40 receivers + 2 publishers over 2 rooms: each message reaches 21 connections.
    assert_eq!(
        report["deliveries"]["expected"].as_u64().unwrap(),
        acked * 21
    );
    assert_eq!(report["deliveries"]["ratio"], 1.0);
    assert_eq!(report["deliveries"]["duplicates"], 0);
    acked
}
