//! Producer flow control against `SPECFORGE-RUNTIME.md` §13.4: SpecForge's hysteresis
//! sequence, the lease cap, the validation rules and the snapshot.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use ferry_control::flow::{FlowControlLimits, FlowControlSnapshot, ProducerFlowControl};
use ferry_core::Error;

fn limits(high_refs: i64, low_refs: i64, high_bytes: i64, low_bytes: i64) -> FlowControlLimits {
    FlowControlLimits {
        high_watermark_refs: high_refs,
        low_watermark_refs: Some(low_refs),
        high_watermark_bytes: Some(high_bytes),
        low_watermark_bytes: Some(low_bytes),
        max_prompt_lease_per_worker: 3,
    }
}

#[test]
fn specforge_hysteresis_sequence() {
    let flow = ProducerFlowControl::new(limits(10, 4, 100, 40)).unwrap();
    // (in-flight refs, resident bytes, expected answer, why)
    let sequence = [
        (9, 99, false, "below both high watermarks"),
        (10, 20, true, "refs reach the high watermark: pause"),
        (5, 20, true, "refs still above the low watermark: stay paused"),
        (4, 40, false, "refs and bytes at their low watermarks: resume"),
        (1, 100, true, "bytes reach the high byte watermark: pause"),
        (1, 50, true, "bytes still above the low byte watermark: stay paused"),
        (1, 40, false, "bytes at the low byte watermark: resume"),
    ];
    for (refs, bytes, expected, why) in sequence {
        assert_eq!(flow.should_pause(refs, bytes), expected, "should_pause({refs}, {bytes}): {why}");
        assert_eq!(flow.is_paused(), expected);
    }
    let snapshot = flow.snapshot();
    assert_eq!(snapshot.pause_transitions, 2);
    assert_eq!(snapshot.resume_transitions, 2);
    assert_eq!(snapshot.wait_checks, 4, "one per check that answered pause");
    assert!(!snapshot.paused);
}

#[test]
fn without_byte_watermarks_only_refs_count() {
    let flow = ProducerFlowControl::new(FlowControlLimits {
        high_watermark_refs: 2,
        low_watermark_refs: Some(1),
        ..FlowControlLimits::default()
    })
    .unwrap();
    assert!(!flow.should_pause(1, i64::MAX), "bytes are ignored when no byte watermark is set");
    assert!(flow.should_pause(2, 0));
    assert!(flow.should_pause(2, 0));
    assert!(!flow.should_pause(1, i64::MAX));
}

#[test]
fn equal_watermarks_pause_at_high_and_resume_just_below() {
    // The default low watermark is the high one: no hysteresis band.
    let flow =
        ProducerFlowControl::new(FlowControlLimits { high_watermark_refs: 5, ..FlowControlLimits::default() }).unwrap();
    assert!(!flow.should_pause(4, 0));
    assert!(flow.should_pause(5, 0));
    assert!(!flow.should_pause(5, 0), "paused at 5 refs, 5 <= low (5): resume");
    assert_eq!(flow.snapshot().pause_transitions, 1);
}

#[test]
fn prompt_lease_is_capped_per_worker() {
    let flow = ProducerFlowControl::new(limits(10, 4, 100, 40)).unwrap();
    assert_eq!(flow.prompt_lease(0), 0);
    assert_eq!(flow.prompt_lease(2), 2);
    assert_eq!(flow.prompt_lease(3), 3);
    assert_eq!(flow.prompt_lease(8), 3);
    assert_eq!(flow.prompt_lease(usize::MAX), 3);
}

#[test]
fn invalid_watermarks_are_rejected_with_the_setting_named() {
    let base = FlowControlLimits::default();
    let cases = [
        (FlowControlLimits { high_watermark_refs: 0, ..base }, "high_watermark_refs must be at least 1, got 0"),
        (FlowControlLimits { high_watermark_refs: -3, ..base }, "high_watermark_refs must be at least 1, got -3"),
        (
            FlowControlLimits { high_watermark_refs: 4, low_watermark_refs: Some(5), ..base },
            "low_watermark_refs must be between 0 and high_watermark_refs (4), got 5",
        ),
        (
            FlowControlLimits { low_watermark_refs: Some(-1), ..base },
            "low_watermark_refs must be between 0 and high_watermark_refs (256), got -1",
        ),
        (
            FlowControlLimits { low_watermark_bytes: Some(10), ..base },
            "low_watermark_bytes (10) is set but high_watermark_bytes is not",
        ),
        (FlowControlLimits { high_watermark_bytes: Some(0), ..base }, "high_watermark_bytes must be at least 1, got 0"),
        (
            FlowControlLimits { high_watermark_bytes: Some(10), low_watermark_bytes: Some(11), ..base },
            "low_watermark_bytes must be between 0 and high_watermark_bytes (10), got 11",
        ),
        (
            FlowControlLimits { high_watermark_bytes: Some(10), low_watermark_bytes: Some(-1), ..base },
            "low_watermark_bytes must be between 0 and high_watermark_bytes (10), got -1",
        ),
        (
            FlowControlLimits { max_prompt_lease_per_worker: 0, ..base },
            "max_prompt_lease_per_worker must be at least 1, got 0",
        ),
    ];
    for (limits, expected) in cases {
        match ProducerFlowControl::new(limits) {
            Err(Error::InvalidArgument(message)) => {
                assert!(message.contains(expected), "{limits:?}: {message:?} lacks {expected:?}")
            }
            other => panic!("{limits:?} should be rejected, got {other:?}"),
        }
    }
    // The boundaries themselves are valid.
    let edge = FlowControlLimits {
        high_watermark_refs: 1,
        low_watermark_refs: Some(0),
        high_watermark_bytes: Some(1),
        low_watermark_bytes: Some(0),
        max_prompt_lease_per_worker: 1,
    };
    assert!(ProducerFlowControl::new(edge).is_ok());
}

#[test]
fn snapshot_reports_resolved_limits_and_serializes() {
    let flow = ProducerFlowControl::new(FlowControlLimits {
        high_watermark_refs: 10,
        high_watermark_bytes: Some(100),
        ..FlowControlLimits::default()
    })
    .unwrap();
    assert!(flow.should_pause(10, 0));
    let snapshot = flow.snapshot();
    assert_eq!(
        snapshot,
        FlowControlSnapshot {
            paused: true,
            pause_transitions: 1,
            resume_transitions: 0,
            wait_checks: 1,
            high_watermark_refs: 10,
            low_watermark_refs: 10,
            high_watermark_bytes: Some(100),
            low_watermark_bytes: Some(100),
            max_prompt_lease_per_worker: 8,
        }
    );
    let json = serde_json::to_value(snapshot).unwrap();
    assert_eq!(json["paused"], true);
    assert_eq!(json["low_watermark_bytes"], 100);
    let back: FlowControlSnapshot = serde_json::from_value(json).unwrap();
    assert_eq!(back, snapshot);
}

#[test]
fn threads_share_one_latched_flag() {
    let flow = ProducerFlowControl::new(FlowControlLimits {
        high_watermark_refs: 10,
        low_watermark_refs: Some(0),
        ..FlowControlLimits::default()
    })
    .unwrap();
    // Many threads see the same over-high reading: exactly one of them makes the transition.
    std::thread::scope(|scope| {
        for _ in 0..8 {
            scope.spawn(|| {
                for _ in 0..100 {
                    assert!(flow.should_pause(10, 0));
                }
            });
        }
    });
    let snapshot = flow.snapshot();
    assert_eq!(snapshot.pause_transitions, 1);
    assert_eq!(snapshot.wait_checks, 800);
    assert!(!flow.should_pause(0, 0));
    assert_eq!(flow.snapshot().resume_transitions, 1);
}

/// The producer's loop against a real channel: publishing pauses at the high watermark of
/// refs the consumer has not acknowledged, and resumes only once acknowledgements bring the
/// in-flight count down to the low watermark.
#[test]
fn the_channels_in_flight_count_drives_the_producers_pause_and_resume() {
    use ferry_control::channel::{FileRefChannel, RefSink, RefSource};
    use ferry_core::json::sample_ref_from_str;

    let line = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/fixtures/specforge-control/refs.jsonl"
    ))
    .unwrap();
    let template = sample_ref_from_str(line.lines().next().unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let producer = FileRefChannel::open(dir.path().join("refs.jsonl"));
    let consumer = FileRefChannel::open(dir.path().join("refs.jsonl"));
    let flow = ProducerFlowControl::new(FlowControlLimits {
        high_watermark_refs: 8,
        low_watermark_refs: Some(4),
        ..FlowControlLimits::default()
    })
    .unwrap();
    let mut published = 0;
    while !flow.should_pause(producer.in_flight_remote().unwrap(), 0) {
        let mut r = template.clone();
        r.sample_id = format!("run0:{published}").into();
        producer.publish(&r).unwrap();
        published += 1;
    }
    assert_eq!(published, 8, "paused at the high watermark");
    assert_eq!(consumer.poll(None).unwrap().len(), 8);
    consumer.mark_consumed(3).unwrap();
    assert!(flow.should_pause(producer.in_flight_remote().unwrap(), 0), "5 in flight: still above the low mark");
    consumer.mark_consumed(1).unwrap();
    assert!(!flow.should_pause(producer.in_flight_remote().unwrap(), 0), "4 in flight: resumed");
    let snapshot = flow.snapshot();
    assert_eq!((snapshot.pause_transitions, snapshot.resume_transitions), (1, 1));
}
