//! The HTTP inbox relay (SpecForge §10) over loopback: ferry's server over the inbox files the
//! distributor writes, ferry's `RemoteInbox` reading it as a `RefSource`, the wire format
//! SpecForge's client expects, and the client's handling of refused, reset and misbehaving
//! servers. Every server binds 127.0.0.1 on an ephemeral port; nothing sleeps a fixed time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use ferry_control::channel::sidecar::{self, CLOSED};
use ferry_control::channel::{FileRefChannel, RefSink, RefSource};
use ferry_control::http_inbox::{DEFAULT_CHUNK_CAP, InboxHttpServer, RemoteInbox};
use ferry_control::queue::RefQueue;
use ferry_control::stream_queue::{StreamQueueOptions, StreamingRefQueue};
use ferry_core::json::{JsonStyle, sample_ref_from_str, sample_ref_to_string};
use ferry_core::{Error, SampleRef};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(10);

fn sref(id: &str) -> SampleRef {
    sample_ref_from_str(&format!(
        r#"{{"sample_id":"{id}","run_id":"run0","source_task_id":null,"feature_store_uri":"mem://t","feature_keys":{{"input_ids":"{id}/input_ids"}},"feature_specs":{{"input_ids":{{"name":"input_ids","shape":[4],"dtype":"int64","device_hint":null,"required":true,"target_repr":null,"target_meta":{{}}}}}},"strategy":"eagle3"}}"#
    ))
    .unwrap()
}

fn line(id: &str) -> String {
    sample_ref_to_string(&sref(id), JsonStyle::Compact).unwrap()
}

fn ids(refs: &[SampleRef]) -> Vec<String> {
    refs.iter().map(|r| r.sample_id.to_string()).collect()
}

/// A started server over a fresh inbox directory (dp 2 unless said), and its origin.
struct Relay {
    dir: tempfile::TempDir,
    server: InboxHttpServer,
    origin: String,
}

impl Relay {
    fn new(dp: usize) -> Relay {
        Relay::with(dp, |s| s)
    }

    fn with(dp: usize, configure: impl FnOnce(InboxHttpServer) -> InboxHttpServer) -> Relay {
        let dir = tempfile::tempdir().unwrap();
        let server = configure(InboxHttpServer::new(dir.path(), dp, "http://127.0.0.1:0", "127.0.0.1").unwrap());
        server.start().unwrap();
        let origin = server.origin().to_string();
        Relay { dir, server, origin }
    }

    /// The distributor's writer for `rank`'s inbox.
    fn writer(&self, rank: usize) -> FileRefChannel {
        FileRefChannel::inbox(self.dir.path(), rank)
    }

    fn inbox_path(&self, rank: usize) -> std::path::PathBuf {
        FileRefChannel::inbox_path(self.dir.path(), rank)
    }

    fn client(&self, rank: usize) -> RemoteInbox {
        RemoteInbox::new(&self.origin, rank, TIMEOUT).unwrap().with_min_pull_interval(Duration::ZERO)
    }

    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .timeout_global(Some(TIMEOUT))
            .http_status_as_error(false)
            .proxy(None)
            .build()
            .into()
    }

    /// A raw `GET`: status, content type, body text.
    fn get(&self, path: &str) -> (u16, String, String) {
        let mut response = Relay::agent().get(&format!("{}{path}", self.origin)).call().unwrap();
        let ctype = response.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
        (response.status().as_u16(), ctype, response.body_mut().read_to_string().unwrap())
    }

    /// A raw `POST` of `body`: status and body text.
    fn post(&self, path: &str, body: &[u8]) -> (u16, String) {
        post_to(&Relay::agent(), &format!("{}{path}", self.origin), body)
    }
}

fn post_to(agent: &ureq::Agent, url: &str, body: &[u8]) -> (u16, String) {
    let mut response = agent.post(url).header("Content-Type", "application/json").send(body).unwrap();
    (response.status().as_u16(), response.body_mut().read_to_string().unwrap())
}

fn counter(path: &Path) -> u64 {
    sidecar::read_counter_strict(path).unwrap()
}

#[test]
fn a_two_ref_batch_is_tail_read_then_nothing_new() {
    let relay = Relay::new(2);
    let client = relay.client(1);
    assert!(client.poll(None).unwrap().is_empty(), "a missing inbox reads as empty");
    relay.writer(1).publish_batch(&[sref("s0"), sref("s1")]).unwrap();
    assert_eq!(ids(&client.poll(None).unwrap()), ["s0", "s1"]);
    assert!(client.poll(None).unwrap().is_empty());
    assert_eq!(client.offset(), std::fs::metadata(relay.inbox_path(1)).unwrap().len());
    // Rank 0's inbox is served too, and the ranks are disjoint.
    relay.writer(0).publish(&sref("s2")).unwrap();
    assert_eq!(ids(&relay.client(0).poll(None).unwrap()), ["s2"]);
    assert!(client.poll(None).unwrap().is_empty());
    // `max` leaves the rest queued.
    relay.writer(1).publish_batch(&[sref("s3"), sref("s4"), sref("s5")]).unwrap();
    assert_eq!(ids(&client.poll(Some(2)).unwrap()), ["s3", "s4"]);
    assert_eq!(ids(&client.poll(Some(2)).unwrap()), ["s5"]);
    assert_eq!(client.describe(), format!("{}/v1/inboxes/1", relay.origin));
    assert_eq!(client.upstream(), "ref-distributor");
}

#[test]
fn marks_of_2_then_1_leave_the_server_counter_at_3() {
    let relay = Relay::new(2);
    let client = relay.client(1);
    client.mark_consumed(2).unwrap();
    client.mark_consumed(0).unwrap();
    client.mark_consumed(1).unwrap();
    assert_eq!(counter(&relay.inbox_path(1)), 3);
    assert_eq!(client.consumed(), 3);
    // The writer side sees it as a local reader's acknowledgement.
    assert_eq!(relay.writer(1).consumed_remote().unwrap(), 3);
    assert_eq!(counter(&relay.inbox_path(0)), 0, "another rank's counter is untouched");
    // A restarted client seeds from the server, then continues from there.
    let restarted = relay.client(1);
    assert_eq!(restarted.seed_consumed().unwrap(), 3);
    restarted.mark_consumed(2).unwrap();
    assert_eq!(counter(&relay.inbox_path(1)), 5);
    // A client that did not seed would move the counter backwards: refused at once.
    let unseeded = relay.client(1);
    let err = unseeded.mark_consumed(1).unwrap_err();
    assert!(matches!(err, Error::Protocol { .. }), "{err}");
    assert!(err.to_string().contains("409") && err.to_string().contains("moved backwards"), "{err}");
    assert_eq!(counter(&relay.inbox_path(1)), 5);
}

#[test]
fn close_is_visible_and_a_status_probe_keeps_unpolled_refs() {
    let relay = Relay::new(2);
    let client = relay.client(1);
    let writer = relay.writer(1);
    writer.publish(&sref("s0")).unwrap();
    // Both probes pull s0, and neither drops it.
    assert!(!client.is_closed().unwrap());
    assert_eq!(client.failure().unwrap(), None);
    writer.publish(&sref("s1")).unwrap();
    writer.close().unwrap();
    assert!(client.is_closed().unwrap());
    assert_eq!(ids(&client.poll(None).unwrap()), ["s0", "s1"]);
    assert!(client.poll(None).unwrap().is_empty());
    assert!(client.is_closed().unwrap());
}

#[test]
fn a_failed_inbox_forwards_its_text_prefixed_and_keeps_refs() {
    let relay = Relay::new(2);
    let client = relay.client(1);
    relay.writer(1).publish(&sref("s0")).unwrap();
    relay.writer(1).fail("TimeoutError: ref-distributor: no refs for 5s").unwrap();
    assert_eq!(
        client.failure().unwrap().as_deref(),
        Some("ref-distributor died:\nTimeoutError: ref-distributor: no refs for 5s")
    );
    match client.is_closed() {
        Err(Error::PeerFailed { peer, reason, channel }) => {
            assert_eq!(peer, "ref-distributor");
            assert!(reason.starts_with("ref-distributor died:\nTimeoutError"), "{reason}");
            assert!(channel.ends_with("/v1/inboxes/1"), "{channel}");
        }
        other => panic!("expected the distributor's failure, got {other:?}"),
    }
    assert_eq!(ids(&client.poll(None).unwrap()), ["s0"], "the probes kept the pulled ref");
    // A queue over the inbox fails with the same reason.
    let queue = StreamingRefQueue::new(
        Arc::new(relay.client(1)),
        StreamQueueOptions { poll: Duration::from_millis(1), ..StreamQueueOptions::default() },
    );
    assert_eq!(ids(&queue.get(1, None).unwrap()), ["s0"]);
    let err = queue.get(1, None).unwrap_err().to_string();
    assert!(err.contains("ref-distributor died") && err.contains("no refs for 5s"), "{err}");
    // A local poison (rank 0's process is gone) reads the same way.
    let other = relay.client(0);
    other.poison("ConnectionError: consumer rank 0 is gone");
    assert_eq!(
        other.failure().unwrap().as_deref(),
        Some("ref-distributor died:\nConnectionError: consumer rank 0 is gone")
    );
}

#[test]
fn twelve_concurrent_posts_of_target_5_all_get_5_and_the_counter_is_exactly_5() {
    let relay = Relay::new(2);
    let url = format!("{}/v1/inboxes/1/consumed", relay.origin);
    let barrier = Arc::new(Barrier::new(12));
    let threads: Vec<_> = (0..12)
        .map(|_| {
            let (url, barrier) = (url.clone(), Arc::clone(&barrier));
            std::thread::spawn(move || {
                let agent = Relay::agent();
                barrier.wait();
                post_to(&agent, &url, br#"{"target":5}"#)
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), (200, r#"{"consumed":5}"#.to_owned()));
    }
    assert_eq!(counter(&relay.inbox_path(1)), 5);
    assert_eq!(
        relay.post("/v1/inboxes/1/consumed", br#"{"target":4}"#),
        (409, r#"{"error":"consumed target moved backwards","consumed":5}"#.to_owned())
    );
    assert_eq!(relay.post("/v1/inboxes/1/consumed", br#"{"target":5}"#), (200, r#"{"consumed":5}"#.to_owned()));
    assert_eq!(counter(&relay.inbox_path(1)), 5);
}

#[test]
fn the_wire_format_is_specforges() {
    let relay = Relay::new(2);
    relay.writer(1).publish(&sref("s0")).unwrap();
    let bytes = std::fs::read(relay.inbox_path(1)).unwrap();
    let (status, ctype, body) = relay.get("/v1/inboxes/1?offset=0");
    assert_eq!((status, ctype.as_str()), (200, "application/json"));
    assert!(!body.contains(": ") && !body.contains(", "), "compact JSON: {body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, ["data", "next_offset", "closed", "failure", "consumed"]);
    use base64::Engine as _;
    assert_eq!(base64::engine::general_purpose::STANDARD.decode(v["data"].as_str().unwrap()).unwrap(), bytes);
    assert_eq!(v["next_offset"], json!(bytes.len()));
    assert_eq!(
        (v["closed"].clone(), v["failure"].clone(), v["consumed"].clone()),
        (json!(false), Value::Null, json!(0))
    );
    // No query: offset 0. Past the end: nothing, next_offset unchanged. Another rank: empty.
    assert_eq!(relay.get("/v1/inboxes/1").2, body);
    let past: Value = serde_json::from_str(&relay.get("/v1/inboxes/1?offset=100000").2).unwrap();
    assert_eq!((past["data"].clone(), past["next_offset"].clone()), (json!(""), json!(100000)));
    let empty: Value = serde_json::from_str(&relay.get("/v1/inboxes/0?offset=3").2).unwrap();
    assert_eq!((empty["data"].clone(), empty["next_offset"].clone()), (json!(""), json!(3)));
    // Errors.
    let unknown = (404, "application/json".to_owned(), r#"{"error":"unknown inbox"}"#.to_owned());
    for path in ["/v1/inboxes/2", "/v1/inboxes/x", "/v1/inboxes/-1", "/v1/other/1", "/v1/inboxes/1/consumed"] {
        assert_eq!(relay.get(path), unknown, "{path}");
    }
    let invalid = (400, "application/json".to_owned(), r#"{"error":"invalid offset"}"#.to_owned());
    for query in ["offset=-1", "offset=x", "offset=1.0"] {
        assert_eq!(relay.get(&format!("/v1/inboxes/1?{query}")), invalid, "{query}");
    }
    assert_eq!(relay.post("/v1/inboxes/2/consumed", br#"{"target":1}"#).0, 404);
    assert_eq!(relay.post("/v1/inboxes/1", br#"{"target":1}"#).0, 404);
    for body in [&br#"{"target":0}"#[..], br#"{"target":"x"}"#, br#"{}"#, b"not json", b""] {
        let (status, text) = relay.post("/v1/inboxes/1/consumed", body);
        assert_eq!(status, 400, "{}", String::from_utf8_lossy(body));
        assert!(serde_json::from_str::<Value>(&text).unwrap()["error"].is_string(), "{text}");
    }
    let big = format!(r#"{{"target":1,"pad":"{}"}}"#, "x".repeat(1100));
    assert_eq!(relay.post("/v1/inboxes/1/consumed", big.as_bytes()), (400, r#"{"error":"invalid body size"}"#.into()));
    assert_eq!(counter(&relay.inbox_path(1)), 0, "no refused request moved the counter");
}

#[test]
fn a_refused_or_reset_connection_during_a_pull_yields_no_refs() {
    // Refused: nothing listens on the port any more.
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let refused = RemoteInbox::new(&format!("http://127.0.0.1:{port}"), 1, TIMEOUT)
        .unwrap()
        .with_min_pull_interval(Duration::ZERO);
    assert!(refused.poll(None).unwrap().is_empty());
    assert!(!refused.is_closed().unwrap());
    assert_eq!(refused.failure().unwrap(), None);
    assert_eq!(refused.offset(), 0);
    // ... but a seed must reach the server, and an acknowledgement gives up after 4 attempts.
    assert!(matches!(refused.seed_consumed(), Err(Error::Io { .. })));
    let started = Instant::now();
    let err = refused.mark_consumed(1).unwrap_err();
    assert!(err.is_peer_loss(), "an unreachable relay is a lost rank 0: {err}");
    assert!(err.to_string().contains("failed after retries"), "{err}");
    assert!(started.elapsed() >= Duration::from_millis(300), "backoff 0.05 + 0.10 + 0.15 s");
    assert_eq!(refused.consumed(), 0);

    // Reset: a listener that accepts each connection and drops it unanswered.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let dropper = std::thread::spawn(move || {
        for _ in 0..3 {
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf);
            drop(conn);
        }
    });
    let reset = RemoteInbox::new(&format!("http://127.0.0.1:{port}"), 1, TIMEOUT)
        .unwrap()
        .with_min_pull_interval(Duration::ZERO);
    assert!(reset.poll(None).unwrap().is_empty());
    assert!(reset.poll(None).unwrap().is_empty());
    assert_eq!(reset.failure().unwrap(), None);
    dropper.join().unwrap();
}

#[test]
fn https_origins_and_origins_with_a_path_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    for origin in
        ["https://127.0.0.1:8080", "https://127.0.0.1:8080/inbox", "http://127.0.0.1:8080/inbox", "http://127.0.0.1"]
    {
        let err = RemoteInbox::new(origin, 1, TIMEOUT).unwrap_err();
        assert!(err.to_string().contains("http://host:port"), "{origin}: {err}");
        let err = InboxHttpServer::new(dir.path(), 2, origin, "127.0.0.1").unwrap_err();
        assert!(err.to_string().contains("http://host:port"), "{origin}: {err}");
    }
    assert!(RemoteInbox::new("http://127.0.0.1:0", 1, TIMEOUT).is_err(), "a client needs the real port");
    let err = InboxHttpServer::new(dir.path(), 1, "http://127.0.0.1:0", "127.0.0.1").unwrap_err();
    assert!(err.to_string().contains("dp_size >= 2"), "{err}");
}

#[test]
fn a_record_torn_across_two_gets_is_parsed_once_whole() {
    let relay = Relay::new(2);
    let client = relay.client(1);
    let record = format!("{}\n", line("s0"));
    let (head, tail) = record.split_at(record.len() / 2);
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(relay.inbox_path(1)).unwrap();
    file.write_all(head.as_bytes()).unwrap();
    assert!(client.poll(None).unwrap().is_empty(), "half a record is never parsed");
    assert_eq!(client.offset(), head.len() as u64, "its bytes are consumed, and kept");
    file.write_all(tail.as_bytes()).unwrap();
    file.write_all(format!("{}\n", line("s1")).as_bytes()).unwrap();
    assert_eq!(ids(&client.poll(None).unwrap()), ["s0", "s1"]);
    // A corrupt record is an error that does not lose the records before it.
    file.write_all(format!("{}\n{{not json\n", line("s2")).as_bytes()).unwrap();
    assert_eq!(ids(&client.poll(None).unwrap()), ["s2"]);
    assert!(matches!(client.poll(None), Err(Error::Corrupt { .. })));
}

#[test]
fn an_inbox_larger_than_the_chunk_cap_is_served_in_bounded_chunks() {
    // A cap smaller than one record: records arrive in pieces, each GET bounded.
    let relay = Relay::with(2, |s| s.with_chunk_cap(100));
    let writer = relay.writer(1);
    let want: Vec<String> = (0..40).map(|i| format!("s{i}")).collect();
    writer.publish_batch(&want.iter().map(|id| sref(id)).collect::<Vec<_>>()).unwrap();
    writer.close().unwrap();
    let len = std::fs::metadata(relay.inbox_path(1)).unwrap().len();
    assert!(len > 100 * 40, "each record is longer than the cap ({len} bytes)");
    let client = relay.client(1);
    let mut got = Vec::new();
    let mut gets = 0u64;
    loop {
        let before = client.offset();
        // `closed` is only reported by an answer that reached the end of the file.
        let closed = client.is_closed().unwrap();
        gets += 1;
        assert!(client.offset() - before <= 100, "a GET returned more than the cap");
        if closed {
            assert_eq!(client.offset(), len);
            break;
        }
        got.extend(ids(&client.poll(None).unwrap()));
        gets += 1;
        assert!(gets <= 2 * (len / 50 + 10), "no progress");
    }
    got.extend(ids(&client.poll(None).unwrap()));
    assert_eq!(got, want);

    // The default cap: a 5 MiB inbox takes more than one answer, each ending on a record.
    let relay = Relay::new(2);
    let writer = relay.writer(1);
    let template = line("big-IDX");
    let mut published = 0usize;
    while (published * template.len()) < DEFAULT_CHUNK_CAP + (1 << 20) {
        let lines: Vec<String> =
            (published..published + 1000).map(|i| template.replace("IDX", &i.to_string())).collect();
        writer.publish_lines(&lines.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
        published += 1000;
    }
    let len = std::fs::metadata(relay.inbox_path(1)).unwrap().len();
    assert!(len > DEFAULT_CHUNK_CAP as u64);
    let mut response = Relay::agent().get(&format!("{}/v1/inboxes/1?offset=0", relay.origin)).call().unwrap();
    let header = |name: &str| response.headers().get(name).map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(header("transfer-encoding"), None, "an explicit length, never chunked");
    let length: usize = header("content-length").unwrap().parse().unwrap();
    assert_eq!(header("server").as_deref(), Some("SpecForgeInbox/1"));
    let body = response.body_mut().read_to_string().unwrap();
    assert_eq!(body.len(), length);
    let first: Value = serde_json::from_str(&body).unwrap();
    let next = first["next_offset"].as_u64().unwrap();
    assert!(next <= DEFAULT_CHUNK_CAP as u64 && next > (DEFAULT_CHUNK_CAP as u64) / 2, "{next}");
    assert_eq!(std::fs::read(relay.inbox_path(1)).unwrap()[next as usize - 1], b'\n');
    let client = relay.client(1);
    let mut count = 0;
    for _ in 0..4 {
        count += client.poll(None).unwrap().len();
    }
    assert_eq!(count, published);
}

#[test]
fn a_stream_queue_reads_and_acknowledges_a_remote_inbox() {
    let relay = Relay::new(3);
    let writer = relay.writer(2);
    writer.publish_batch(&[sref("s0"), sref("s1"), sref("s2")]).unwrap();
    writer.close().unwrap();
    let queue = StreamingRefQueue::new(
        Arc::new(relay.client(2)),
        StreamQueueOptions {
            poll: Duration::from_millis(1),
            idle_timeout: Some(TIMEOUT),
            ..StreamQueueOptions::default()
        },
    );
    let refs = queue.get(2, None).unwrap();
    assert_eq!(ids(&refs), ["s0", "s1"]);
    assert_eq!(counter(&relay.inbox_path(2)), 0, "a get is not an acknowledgement");
    queue.ack(&refs).unwrap();
    assert_eq!(counter(&relay.inbox_path(2)), 2);
    let rest = queue.get(2, None).unwrap();
    assert_eq!(ids(&rest), ["s2"], "the end of the stream");
    queue.ack(&rest).unwrap();
    assert!(queue.get(2, None).unwrap().is_empty());
    assert_eq!(writer.consumed_remote().unwrap(), 3);
}

#[test]
fn dozens_of_ranks_polling_at_once_are_all_answered() {
    let ranks = 48;
    let relay = Relay::new(ranks);
    for rank in 0..ranks {
        relay.writer(rank).publish(&sref(&format!("r{rank}"))).unwrap();
    }
    let barrier = Arc::new(Barrier::new(ranks));
    let origin = relay.origin.clone();
    let threads: Vec<_> = (0..ranks)
        .map(|rank| {
            let (origin, barrier) = (origin.clone(), Arc::clone(&barrier));
            std::thread::spawn(move || {
                // Fresh connections each time, as many clients at a step boundary.
                barrier.wait();
                for _ in 0..5 {
                    let url = format!("{origin}/v1/inboxes/{rank}?offset=0");
                    let response = Relay::agent().get(&url).call().expect("no connection is refused or reset");
                    assert_eq!(response.status().as_u16(), 200);
                }
                let client = RemoteInbox::new(&origin, rank, TIMEOUT).unwrap().with_min_pull_interval(Duration::ZERO);
                ids(&client.poll(None).unwrap())
            })
        })
        .collect();
    for (rank, t) in threads.into_iter().enumerate() {
        assert_eq!(t.join().unwrap(), [format!("r{rank}")]);
    }
}

#[test]
fn start_and_stop_are_idempotent_and_a_stopped_server_reads_as_no_refs() {
    let relay = Relay::new(2);
    let addr = relay.server.local_addr().unwrap();
    assert_eq!(relay.server.start().unwrap(), addr, "a second start keeps the running server");
    relay.writer(1).publish(&sref("s0")).unwrap();
    let client = relay.client(1);
    assert_eq!(ids(&client.poll(None).unwrap()), ["s0"]);
    let stopping = Instant::now();
    relay.server.stop().unwrap();
    relay.server.stop().unwrap();
    assert!(stopping.elapsed() < Duration::from_secs(5));
    assert_eq!(relay.server.local_addr(), None);
    relay.writer(1).publish(&sref("s1")).unwrap();
    assert!(client.poll(None).unwrap().is_empty(), "a stopped server reads as nothing new");
    assert!(std::fs::metadata(relay.inbox_path(1)).is_ok() && !sidecar::exists(&relay.inbox_path(1), CLOSED));
}

/// A fake server answering each request from `answers` in turn; returns its origin and a count
/// of the requests it received.
fn fake_server(answers: Vec<(u16, String)>) -> (String, Arc<AtomicUsize>, std::thread::JoinHandle<()>) {
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let port = server.server_addr().to_ip().unwrap().port();
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&seen);
    let handle = std::thread::spawn(move || {
        for (status, body) in answers {
            let request = server.recv_timeout(TIMEOUT).unwrap().expect("the client's request");
            counter.fetch_add(1, Ordering::SeqCst);
            request.respond(tiny_http::Response::from_string(body).with_status_code(status)).unwrap();
        }
    });
    (format!("http://127.0.0.1:{port}"), seen, handle)
}

#[test]
fn an_invalid_byte_range_is_an_error_and_the_offset_stays() {
    let data = base64_of(b"abc\n");
    let (origin, _, server) = fake_server(vec![
        (200, format!(r#"{{"data":"{data}","next_offset":7,"closed":false,"failure":null}}"#)),
        (200, r#"{"data":"","next_offset":0,"closed":false}"#.into()),
    ]);
    let client = RemoteInbox::new(&origin, 1, TIMEOUT).unwrap().with_min_pull_interval(Duration::ZERO);
    let err = client.poll(None).unwrap_err();
    assert!(err.to_string().contains("invalid byte range"), "{err}");
    assert_eq!(client.offset(), 0);
    // A SpecForge server has no `consumed`: a seed refuses to guess.
    let err = client.seed_consumed().unwrap_err().to_string();
    assert!(err.contains("does not report its consumed count"), "{err}");
    server.join().unwrap();
}

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[test]
fn acknowledgements_retry_only_transient_failures_and_check_the_confirmation() {
    // Two 5xx answers, then the confirmation: three requests, success.
    let (origin, seen, server) =
        fake_server(vec![(503, r#"{"error":"busy"}"#.into()), (500, "oops".into()), (200, r#"{"consumed":2}"#.into())]);
    let client = RemoteInbox::new(&origin, 1, TIMEOUT).unwrap().with_min_pull_interval(Duration::ZERO);
    client.mark_consumed(2).unwrap();
    assert_eq!((seen.load(Ordering::SeqCst), client.consumed()), (3, 2));
    server.join().unwrap();

    // 400, 404 and 409 fail at once, with the server's text.
    for (status, body, want) in [
        (400, r#"{"error":"target must be positive"}"#, "target must be positive"),
        (404, r#"{"error":"unknown inbox"}"#, "unknown inbox"),
        (409, r#"{"error":"consumed target moved backwards","consumed":9}"#, "moved backwards"),
    ] {
        let (origin, seen, server) = fake_server(vec![(status, body.into())]);
        let client = RemoteInbox::new(&origin, 1, TIMEOUT).unwrap().with_min_pull_interval(Duration::ZERO);
        let err = client.mark_consumed(1).unwrap_err();
        assert!(matches!(err, Error::Protocol { .. }), "{err}");
        assert!(err.to_string().contains(want) && err.to_string().contains(&status.to_string()), "{err}");
        assert_eq!((seen.load(Ordering::SeqCst), client.consumed()), (1, 0));
        server.join().unwrap();
    }

    // A confirmation of another value is an error.
    let (origin, _, server) = fake_server(vec![(200, r#"{"consumed":7}"#.into())]);
    let client = RemoteInbox::new(&origin, 1, TIMEOUT).unwrap().with_min_pull_interval(Duration::ZERO);
    let err = client.mark_consumed(1).unwrap_err().to_string();
    assert!(err.contains("did not confirm consumed target 1"), "{err}");
    assert_eq!(client.consumed(), 0);
    server.join().unwrap();

    // A GET answered 404 (a rank the server does not have) is an error, not "nothing new".
    let (origin, _, server) = fake_server(vec![(404, r#"{"error":"unknown inbox"}"#.into())]);
    let client = RemoteInbox::new(&origin, 5, TIMEOUT).unwrap().with_min_pull_interval(Duration::ZERO);
    assert!(client.poll(None).unwrap_err().to_string().contains("unknown inbox"));
    server.join().unwrap();
}

#[test]
fn the_consumer_signals_of_a_producer_channel_are_refused() {
    let relay = Relay::new(2);
    let client = relay.client(1);
    for result in
        [client.mark_consumer_done(), client.mark_consumer_failed("x"), client.publish_consumer_quantum(4, false)]
    {
        assert!(matches!(result, Err(Error::InvalidArgument(ref m)) if m.contains("HTTP inbox relay")), "{result:?}");
    }
}

#[test]
fn polls_sooner_than_the_pull_interval_answer_from_the_last_pull() {
    let relay = Relay::new(2);
    let client = RemoteInbox::new(&relay.origin, 1, TIMEOUT).unwrap().with_min_pull_interval(Duration::from_secs(3600));
    relay.writer(1).publish(&sref("s0")).unwrap();
    assert_eq!(ids(&client.poll(None).unwrap()), ["s0"], "the first poll pulls");
    relay.writer(1).publish(&sref("s1")).unwrap();
    for _ in 0..5 {
        assert!(client.poll(None).unwrap().is_empty(), "no request before the interval has passed");
        assert!(!client.is_closed().unwrap());
    }
    assert_eq!(client.offset(), (line("s0").len() + 1) as u64, "the second record was never fetched");
    // With a short interval the next record arrives once the interval has passed.
    let client = RemoteInbox::new(&relay.origin, 1, TIMEOUT).unwrap().with_min_pull_interval(Duration::from_millis(20));
    assert_eq!(ids(&client.poll(None).unwrap()), ["s0", "s1"]);
    relay.writer(1).publish(&sref("s2")).unwrap();
    let deadline = Instant::now() + TIMEOUT;
    let mut got = Vec::new();
    while got.is_empty() && Instant::now() < deadline {
        got = client.poll(None).unwrap();
    }
    assert_eq!(ids(&got), ["s2"]);
}

#[test]
fn an_acknowledgement_answered_5xx_every_time_is_a_protocol_error_with_the_servers_text() {
    let answers = vec![(500, r#"{"error":"disk full writing the counter"}"#.to_string()); 4];
    let (origin, seen, server) = fake_server(answers);
    let client = RemoteInbox::new(&origin, 1, TIMEOUT).unwrap().with_min_pull_interval(Duration::ZERO);
    let err = client.mark_consumed(3).unwrap_err();
    assert!(matches!(err, Error::Protocol { .. }), "a relay that answers is not a lost peer: {err}");
    assert!(!err.is_peer_loss());
    assert!(err.to_string().contains("disk full writing the counter"), "{err}");
    assert_eq!((seen.load(Ordering::SeqCst), client.consumed()), (4, 0));
    server.join().unwrap();
    // A seed answered 5xx says so too.
    let (origin, _, server) = fake_server(vec![(503, r#"{"error":"busy"}"#.into())]);
    let client = RemoteInbox::new(&origin, 1, TIMEOUT).unwrap();
    let err = client.seed_consumed().unwrap_err();
    assert!(matches!(err, Error::Protocol { .. }) && err.to_string().contains("busy"), "{err}");
    server.join().unwrap();
}
