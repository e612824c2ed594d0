//! What the load generator's end-to-end tests share: the JSON report of a run that must
//! have succeeded.

use std::process::Output;

/// The JSON report of a run that must have succeeded.
pub fn report(output: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(&stdout).expect("JSON report")
}
