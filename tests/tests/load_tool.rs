//! `broker-load`, the load generator of `make bench`, against a real broker: what it reports
//! must add up, since the benchmarks' figures come from it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use e2e::{Broker, binary, stderr};

fn load(b: &Broker, args: &[&str]) -> std::process::Output {
    Command::new(binary("broker-load").unwrap())
        .args(["run", "--url", &format!("https://127.0.0.1:{}", b.port)])
        .arg("--ca")
        .arg(b.dir.join("ca.pem"))
        .arg("--sim-dir")
        .arg(b.dir.join("sim"))
        .args(["--json", "--sources", "1"])
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn open_loop_accounts_for_every_scheduled_flow() {
    let b = Broker::start();
    b.provision(&b.dir.join("policy.json"));

    // 20 flows/s for 2 s: 40 due; each one ran (and its secret opened) or is reported missed.
    let out = load(
        &b,
        &[
            "--rate",
            "20",
            "--duration",
            "2",
            "--concurrency",
            "4",
            "--check-every",
            "1",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["errors"], serde_json::json!({}), "{v}");
    assert_eq!(v["rate"], 20.0);
    let flows = v["flows"].as_u64().unwrap();
    let missed = v["missed"].as_u64().unwrap();
    assert_eq!(flows + missed, 40, "{v}");
    assert!(flows > 0, "{v}");
    assert_eq!(v["secrets_opened"].as_u64().unwrap(), flows);
    let p = &v["latency_ms"];
    assert!(p["p50"].as_f64().unwrap() > 0.0);
    assert!(p["p50"].as_f64() <= p["p99"].as_f64() && p["p99"].as_f64() <= p["max"].as_f64());

    assert!(v["timer_late_ms"]["p99"].as_f64().is_some(), "{v}");

    // Far more than the broker can do with one worker: most flows never start, and those
    // that do are charged for their wait from when they were due (up to about the run).
    let out = load(
        &b,
        &["--rate", "100000", "--duration", "1", "--concurrency", "1"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["errors"], serde_json::json!({}), "{v}");
    let (flows, missed) = (v["flows"].as_u64().unwrap(), v["missed"].as_u64().unwrap());
    assert_eq!(flows + missed, 100_000, "{v}");
    assert!(missed > 90_000, "{v}");
    assert!(v["latency_ms"]["max"].as_f64().unwrap() >= 500.0, "{v}");

    // Closed loop: no schedule, nothing missed.
    let out = load(&b, &["--duration", "1", "--concurrency", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["rate"], serde_json::Value::Null);
    assert_eq!(v["missed"], serde_json::Value::Null);
    assert!(v["flows"].as_u64().unwrap() > 0, "{v}");

    // A rate that is not a positive number is refused.
    for bad in ["0", "-5", "NaN"] {
        let out = load(&b, &[&format!("--rate={bad}"), "--duration", "1"]);
        assert!(!out.status.success());
        assert!(stderr(&out).contains("--rate"), "{}", stderr(&out));
    }
}
