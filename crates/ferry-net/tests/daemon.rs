//! The daemon as the one authority over the bytes: clients over TCP and a Unix socket share
//! one liveness index. Covered here: consume-once across clients, an abort by one client
//! refusing every other client's reads, a disconnected (or SIGKILLed) client's leases released
//! by the daemon, a producer process that exits before its samples are read, errors keeping
//! their Python class across the wire, and malformed frames closing only their connection.
//!
//! Multi-process tests re-execute this test binary as the child (`child_role` runs only when
//! `FERRY_NET_CHILD` is set). Every wait has a deadline.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use ferry_core::{Error, JsonMap, SampleId, TensorView};
use ferry_net::frame::{HEADER_LEN, Header, Op, flags, read_head, write_head};
use ferry_net::{Client, ConnectOptions, DaemonConfig, DaemonHandle, Limits, Route, RoutePreference};
use ferry_store::{Secret, StoreOptions, open_store};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(30);

struct Daemon {
    handle: DaemonHandle,
    arena: Option<std::sync::Arc<ferry_shm::ArenaBackend>>,
    _dir: tempfile::TempDir,
}

/// The arena size of test daemons.
const ARENA: u64 = 16 << 20;

impl Daemon {
    /// A daemon over a shared-memory arena, as `ferry serve` runs.
    fn start() -> Daemon {
        Daemon::with(StoreOptions::default())
    }

    fn with(options: StoreOptions) -> Daemon {
        Daemon::configured(options, true, None)
    }

    /// A daemon over the in-memory backend (no arena: bytes travel in the socket only).
    fn mem() -> Daemon {
        Daemon::configured(StoreOptions::default(), false, None)
    }

    fn configured(mut options: StoreOptions, arena: bool, secret: Option<&str>) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        options.store_id = Some("daemon".into());
        let mut config = DaemonConfig::new(Some("127.0.0.1:0".parse().unwrap()), Some(dir.path().join("ferry.sock")));
        config.secret = secret.map(Secret::new);
        let (store, backend) = if arena {
            let (store, backend) = ferry_net::arena_store(ARENA, options).unwrap();
            (store, Some(backend))
        } else {
            (open_store("mem://daemon", options).unwrap(), None)
        };
        config.arena = backend.clone();
        Daemon { handle: ferry_net::start(store, config).unwrap(), arena: backend, _dir: dir }
    }

    /// Arena bytes allocated (0 when every region was freed).
    fn arena_used(&self) -> u64 {
        self.arena.as_ref().map_or(0, |a| a.arena().stats().used)
    }

    fn tcp(&self) -> String {
        format!("ferry://{}", self.handle.tcp_addr().unwrap())
    }

    fn unix(&self) -> String {
        format!("ferry+unix://{}", self.handle.unix_path().unwrap().display())
    }

    fn active_leases(&self) -> u64 {
        self.handle.store().health().active_leases
    }
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A sample whose bytes encode `seed`: `hidden` (1, 4, 8) bf16 and `input_ids` (4) int64.
fn sample(seed: u8) -> (Vec<u8>, Vec<i64>) {
    (
        (0..64).map(|i| seed.wrapping_mul(31).wrapping_add(i)).collect(),
        (0..4).map(|i| i64::from(seed) * 10 + i).collect(),
    )
}

fn put(client: &Client, sid: &str, seed: u8) -> ferry_core::SampleRef {
    let (hidden, ids) = sample(seed);
    let tensors = [
        ("hidden", TensorView::new(ferry_core::DType::BFloat16, &[1, 4, 8], &hidden).unwrap()),
        ("input_ids", TensorView::from_elements(&[4], &ids).unwrap()),
    ];
    client.put(sid, &tensors, JsonMap::new()).unwrap()
}

fn read_back(
    client: &Client,
    r: &ferry_core::SampleRef,
) -> ferry_core::Result<(Vec<u8>, Vec<u8>, ferry_core::FeatureHandle)> {
    let mut hidden = vec![0u8; 64];
    let mut ids = vec![0u8; 32];
    let handle = client.get_into(r, &mut [("hidden", &mut hidden[..]), ("input_ids", &mut ids[..])])?;
    Ok((hidden, ids, handle))
}

fn ids_bytes(ids: &[i64]) -> Vec<u8> {
    ids.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A raw Unix connection past the greeting and authentication (no secret, no arena).
fn raw_attach(daemon: &Daemon) -> UnixStream {
    let mut raw = UnixStream::connect(daemon.handle.unix_path().unwrap()).unwrap();
    raw.set_read_timeout(Some(DEADLINE)).unwrap();
    read_head(&mut raw, &Limits::default()).unwrap().unwrap(); // Hello
    let meta = br#"{"client_nonce": "00"}"#;
    let header = Header { op: Op::Auth, flags: 0, request_id: 0, meta_len: meta.len() as u32, payload_len: 0 };
    write_head(&mut raw, &header, meta, &[]).unwrap();
    let reply = read_head(&mut raw, &Limits::default()).unwrap().unwrap();
    assert!(!reply.header.has(flags::ERROR), "{}", String::from_utf8_lossy(&reply.meta));
    raw
}

#[test]
fn put_then_get_into_then_release_consumes_once_over_every_route() {
    for daemon in [Daemon::start(), Daemon::mem()] {
        consume_once_over_every_route(&daemon);
        assert_eq!(daemon.arena_used(), 0, "every region went back to the arena");
    }
}

fn consume_once_over_every_route(daemon: &Daemon) {
    for (i, (producer_uri, consumer_uri)) in
        [(daemon.tcp(), daemon.unix()), (daemon.unix(), daemon.tcp()), (daemon.unix(), daemon.unix())]
            .into_iter()
            .enumerate()
    {
        let producer = Client::connect(&producer_uri).unwrap();
        let consumer = Client::connect(&consumer_uri).unwrap();
        assert_eq!(consumer.store_id().as_str(), "daemon");
        let on_unix = consumer_uri.starts_with("ferry+unix");
        let want = match (on_unix, daemon.arena.is_some()) {
            (true, true) => Route::Shm,
            (true, false) => Route::Unix,
            (false, _) => Route::Tcp,
        };
        assert_eq!(consumer.route(), want);
        let sid = format!("run0:task{i}");
        let r = put(&producer, &sid, 7);
        let (hidden, ids, handle) = read_back(&consumer, &r).unwrap();
        let (want_hidden, want_ids) = sample(7);
        assert_eq!(hidden, want_hidden);
        assert_eq!(ids, ids_bytes(&want_ids));
        assert_eq!(daemon.active_leases(), 1);
        consumer.release(&handle).unwrap();
        assert_eq!(daemon.handle.store().health().resident_samples, 0, "the last lease frees the sample");
        let err = read_back(&producer, &r).unwrap_err();
        assert!(err.is_not_available(), "consumed once: the producer's read must fail, got {err}");
    }
}

#[test]
fn pipelined_batches_read_many_samples_each_with_its_own_outcome() {
    for daemon in [Daemon::start(), Daemon::mem()] {
        for uri in [daemon.tcp(), daemon.unix()] {
            let client = Client::connect(&uri).unwrap();
            // More samples than the pipeline window, so the window slides.
            let n = ferry_net::PIPELINE_WINDOW * 3 + 5;
            let refs: Vec<_> = (0..n).map(|i| put(&client, &format!("run0:p{i}"), i as u8)).collect();
            // One sample is gone before the batch (a remote error), one entry has a wrong buffer
            // (refused before it is sent): neither disturbs the others.
            client.abort(&refs[7].sample_id).unwrap();
            let mut hidden = vec![vec![0u8; 64]; n];
            let mut ids = vec![vec![0u8; 32]; n];
            ids[11] = vec![0u8; 8];
            let mut batch: Vec<ferry_net::GetInto<'_>> = refs
                .iter()
                .zip(hidden.iter_mut().zip(ids.iter_mut()))
                .map(|(r, (h, i))| ferry_net::GetInto {
                    r,
                    dsts: vec![("hidden", &mut h[..]), ("input_ids", &mut i[..])],
                })
                .collect();
            let results = client.get_into_many(&mut batch).unwrap();
            drop(batch);
            assert_eq!(results.len(), n);
            let mut handles = Vec::new();
            for (i, result) in results.into_iter().enumerate() {
                match i {
                    7 => assert!(result.unwrap_err().is_not_available(), "{uri}: aborted sample"),
                    11 => assert!(matches!(result, Err(Error::InvalidArgument(_))), "{uri}: wrong buffer"),
                    _ => {
                        let (want_hidden, want_ids) = sample(i as u8);
                        assert_eq!(hidden[i], want_hidden, "{uri}: sample {i}");
                        assert_eq!(ids[i], ids_bytes(&want_ids), "{uri}: sample {i}");
                        handles.push(result.unwrap());
                    }
                }
            }
            assert_eq!(daemon.active_leases(), n as u64 - 2, "{uri}: no lease for the failed entries");
            // A handle twice in one batch: releasing is idempotent, as in the core.
            let mut twice = handles.clone();
            twice.insert(3, handles[2].clone());
            let released = client.release_many(&twice).unwrap();
            assert!(released.iter().all(Result::is_ok), "{uri}: {released:?}");
            let health = daemon.handle.store().health();
            // Sample 11 was never read (its entry was refused locally), so it stays.
            assert_eq!((health.active_leases, health.resident_samples), (0, 1), "{uri}");
            client.abort(&refs[11].sample_id).unwrap();
            assert!(client.get_into_many(&mut []).unwrap().is_empty());
        }
        assert_eq!(daemon.arena_used(), 0);
    }
}

#[test]
fn pipelined_batches_of_large_samples_never_deadlock() {
    // Replies far larger than any socket buffer, many in flight: the client reads each reply
    // before it sends more, so neither side blocks writing while the other does.
    let daemon = Daemon::mem();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let uri = daemon.tcp();
    std::thread::spawn(move || {
        let client = Client::connect(&uri).unwrap();
        let big: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 253) as u8).collect();
        let n = ferry_net::PIPELINE_WINDOW + 8;
        let refs: Vec<_> = (0..n)
            .map(|i| {
                let shape = [big.len() as u64];
                let t = [("x", TensorView::new(ferry_core::DType::UInt8, &shape, &big).unwrap())];
                client.put(&format!("run0:big{i}"), &t, JsonMap::new()).unwrap()
            })
            .collect();
        let mut bufs = vec![vec![0u8; big.len()]; n];
        let mut batch: Vec<_> = refs
            .iter()
            .zip(bufs.iter_mut())
            .map(|(r, b)| ferry_net::GetInto { r, dsts: vec![("x", &mut b[..])] })
            .collect();
        let handles: Vec<_> = client.get_into_many(&mut batch).unwrap().into_iter().map(Result::unwrap).collect();
        drop(batch);
        assert!(bufs.iter().all(|b| *b == big));
        assert!(client.release_many(&handles).unwrap().iter().all(Result::is_ok));
        done_tx.send(()).unwrap();
    });
    done_rx.recv_timeout(DEADLINE).expect("the pipelined batch finished before the deadline");
    assert_eq!(daemon.handle.store().health().resident_samples, 0);
}

#[test]
fn get_returns_owned_tensors_and_describe_the_specs() {
    let daemon = Daemon::start();
    let client = Client::connect(&daemon.unix()).unwrap();
    let r = put(&client, "s0", 3);
    let specs = client.describe(&r).unwrap();
    assert_eq!(specs["hidden"].shape, vec![1, 4, 8]);
    let (tensors, handle) = client.get(&r, None).unwrap();
    assert_eq!(tensors["hidden"].bytes(), sample(3).0.as_slice());
    assert_eq!(tensors["input_ids"].shape(), [4]);
    client.release(&handle).unwrap();
}

#[test]
fn get_recycles_its_output_buffers_through_the_clients_pool() {
    let daemon = Daemon::with(StoreOptions { retain_on_release: true, ..StoreOptions::default() });
    for uri in [daemon.unix(), daemon.tcp()] {
        let client = Client::connect(&uri).unwrap();
        let r = put(&client, &format!("pooled-{}", uri.len()), 5);
        let (first, handle) = client.get(&r, None).unwrap();
        client.release(&handle).unwrap();
        let hidden_at = first["hidden"].bytes().as_ptr();
        assert_eq!(client.output_pool().stats().hits, 0, "a cold pool allocates");
        drop(first);
        assert_eq!(client.output_pool().stats().pooled_buffers, 2, "dropped outputs go back to the pool");
        // Warm: the same pages, fully overwritten with the sample's bytes.
        let (second, handle) = client.get(&r, None).unwrap();
        assert_eq!(client.output_pool().stats().hits, 2);
        assert_eq!(second["hidden"].bytes(), sample(5).0.as_slice());
        assert_eq!(second["input_ids"].bytes(), ids_bytes(&sample(5).1).as_slice());
        let reused = [second["hidden"].bytes().as_ptr(), second["input_ids"].bytes().as_ptr()];
        assert!(reused.contains(&hidden_at), "a warm get reuses a pooled buffer");
        client.release(&handle).unwrap();
        // A pool shared by clients.
        let shared = ferry_core::BufferPool::new(1 << 20);
        let other = Client::connect(&uri).unwrap().with_output_pool(shared.clone());
        drop(other.get(&r, None).unwrap());
        assert_eq!(shared.stats().pooled_buffers, 2);
        client.abort(&r.sample_id).unwrap();
    }
}

#[test]
fn an_abort_by_one_client_refuses_every_other_clients_reads() {
    // SpecForge's known gap: its liveness index is per process, so an abort elsewhere cannot stop
    // a read. Here the daemon holds the only index.
    let daemon = Daemon::start();
    let producer = Client::connect(&daemon.tcp()).unwrap();
    let reader = Client::connect(&daemon.unix()).unwrap();
    let aborter = Client::connect(&daemon.unix()).unwrap();
    let r = put(&producer, "s0", 1);
    let (_, _, held) = read_back(&reader, &r).unwrap();
    aborter.abort(&SampleId::new("s0")).unwrap();
    let err = read_back(&reader, &r).unwrap_err();
    assert!(matches!(err, Error::UseAfterFree { .. }), "the daemon's own error arrives: {err}");
    let err = read_back(&producer, &r).unwrap_err();
    assert!(err.is_not_available(), "{err}");
    reader.release(&held).unwrap(); // a stale release is a no-op
    assert_eq!(daemon.active_leases(), 0);
    assert_eq!(daemon.handle.store().health().resident_bytes, 0);
}

#[test]
fn a_disconnected_clients_leases_are_released_by_the_daemon() {
    let daemon = Daemon::with(StoreOptions { retain_on_release: true, ..StoreOptions::default() });
    let producer = Client::connect(&daemon.tcp()).unwrap();
    let r = put(&producer, "s0", 2);

    // A client that says goodbye.
    let polite = Client::connect(&daemon.unix()).unwrap();
    let _ = read_back(&polite, &r).unwrap();
    let _ = read_back(&polite, &r).unwrap();
    assert_eq!(daemon.active_leases(), 2);
    drop(polite);
    wait_until("the polite client's leases", || daemon.active_leases() == 0);

    // A raw connection that takes a lease and vanishes without a word.
    let mut raw = raw_attach(&daemon);
    let meta = serde_json::to_vec(&serde_json::json!({"ref": r, "names": ["hidden"]})).unwrap();
    let header = Header { op: Op::Get, flags: 0, request_id: 1, meta_len: meta.len() as u32, payload_len: 0 };
    write_head(&mut raw, &header, &meta, &[]).unwrap();
    let reply = read_head(&mut raw, &Limits::default()).unwrap().unwrap();
    assert!(!reply.header.has(flags::ERROR), "{}", String::from_utf8_lossy(&reply.meta));
    assert_eq!(daemon.active_leases(), 1);
    drop(raw);
    wait_until("the vanished client's lease", || daemon.active_leases() == 0);
    assert_eq!(daemon.handle.store().health().resident_samples, 1, "retained data stays");
}

#[test]
fn errors_keep_their_python_class_across_the_wire() {
    let daemon = Daemon::with(StoreOptions { max_resident_bytes: Some(50), ..StoreOptions::default() });
    let client = Client::connect(&daemon.tcp()).unwrap();
    let (hidden, ids) = sample(1);
    let tensors = [
        ("hidden", TensorView::new(ferry_core::DType::BFloat16, &[1, 4, 8], &hidden).unwrap()),
        ("input_ids", TensorView::from_elements(&[4], &ids).unwrap()),
    ];
    let err = client.put("big", &tensors, JsonMap::new()).unwrap_err();
    assert_eq!(err.python_exception(), "MemoryError", "{err}");
    assert!(err.to_string().contains("50"), "the error names the budget: {err}");
    let deadline = Instant::now() + Duration::from_millis(20);
    let err = client.put_until("big", &tensors, JsonMap::new(), deadline).unwrap_err();
    assert!(err.to_string().contains("50"), "{err}");
    // The connection goes on after errors.
    client.ping().unwrap();
    let mut bogus = put_small(&client);
    bogus.sample_id = "never-written".into();
    let err = client.get(&bogus, None).unwrap_err();
    assert!(err.is_not_available(), "{err}");
}

fn put_small(client: &Client) -> ferry_core::SampleRef {
    let ids: Vec<i64> = vec![1, 2];
    client.put("small", &[("input_ids", TensorView::from_elements(&[2], &ids).unwrap())], JsonMap::new()).unwrap()
}

#[test]
fn wrong_buffer_sizes_are_refused_and_leak_no_lease() {
    let daemon = Daemon::start();
    let client = Client::connect(&daemon.unix()).unwrap();
    let r = put(&client, "s0", 4);
    let mut short = [0u8; 10];
    let err = client.get_into(&r, &mut [("hidden", &mut short[..])]).unwrap_err();
    assert!(err.to_string().contains("needs 64"), "{err}");
    assert_eq!(daemon.active_leases(), 0);
    let (hidden, _, handle) = read_back(&client, &r).unwrap();
    assert_eq!(hidden, sample(4).0, "the connection stayed framed");
    client.release(&handle).unwrap();
}

#[test]
fn malformed_frames_close_only_their_connection() {
    let daemon = Daemon::start();
    let survivor = Client::connect(&daemon.tcp()).unwrap();
    let r = put(&survivor, "s0", 5);
    let cases: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\0\0\0\0\0\0".to_vec(),
        Header { op: Op::Put, flags: 0, request_id: 1, meta_len: u32::MAX, payload_len: 0 }.encode().to_vec(),
        Header { op: Op::Put, flags: 0, request_id: 1, meta_len: 2, payload_len: u64::MAX }.encode().to_vec(),
        {
            let mut b = Header { op: Op::Ping, flags: 0, request_id: 1, meta_len: 0, payload_len: 0 }.encode();
            b[6] = 200; // unknown op
            b.to_vec()
        },
    ];
    for bytes in cases {
        let mut raw = UnixStream::connect(daemon.handle.unix_path().unwrap()).unwrap();
        raw.set_read_timeout(Some(DEADLINE)).unwrap();
        read_head(&mut raw, &Limits::default()).unwrap().unwrap(); // Hello
        raw.write_all(&bytes).unwrap();
        // The daemon closes it (a reset when it left our bytes unread): no reply either way.
        let mut rest = Vec::new();
        match raw.read_to_end(&mut rest) {
            Ok(_) => assert!(rest.is_empty(), "no reply to a malformed frame"),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        }
    }
    // Bad metadata is an error reply, and that connection goes on (its payload was skipped).
    let mut raw = raw_attach(&daemon);
    let meta = b"{\"sample_id\": 3}";
    let header = Header { op: Op::Put, flags: 0, request_id: 9, meta_len: meta.len() as u32, payload_len: 5 };
    write_head(&mut raw, &header, meta, &[b"abcde"]).unwrap();
    let reply = read_head(&mut raw, &Limits::default()).unwrap().unwrap();
    assert!(reply.header.has(flags::ERROR) && reply.header.request_id == 9);
    assert!(String::from_utf8_lossy(&reply.meta).contains("Put metadata"), "{}", String::from_utf8_lossy(&reply.meta));
    let ping = Header { op: Op::Ping, flags: 0, request_id: 10, meta_len: 0, payload_len: 0 };
    write_head(&mut raw, &ping, &[], &[]).unwrap();
    assert_eq!(read_head(&mut raw, &Limits::default()).unwrap().unwrap().header.request_id, 10);

    let (hidden, _, handle) = read_back(&survivor, &r).unwrap();
    assert_eq!(hidden, sample(5).0, "other connections are unaffected");
    survivor.release(&handle).unwrap();
    assert_eq!(HEADER_LEN, 32);
}

#[test]
fn a_stopped_daemon_gives_clients_a_clear_error_never_wrong_bytes() {
    let daemon = Daemon::start();
    let client = Client::connect(&daemon.tcp()).unwrap();
    let r = put(&client, "s0", 6);
    let Daemon { handle, .. } = daemon;
    handle.stop();
    let err = read_back(&client, &r).unwrap_err();
    assert!(matches!(err, ferry_core::Error::Io { .. }), "a connection error, not data: {err}");
    let again = read_back(&client, &r).unwrap_err();
    assert!(again.to_string().contains("connect again"), "{again}");
}

#[test]
fn the_secret_is_proven_never_sent_and_a_wrong_one_closes_the_connection() {
    let daemon = Daemon::configured(StoreOptions::default(), true, Some("s3cret"));
    let with = |secret: Option<&str>, route| ConnectOptions { secret: secret.map(Secret::new), route, prefault: false };
    for uri in [daemon.tcp(), daemon.unix()] {
        let client = Client::connect_with(&uri, with(Some("s3cret"), RoutePreference::Auto)).unwrap();
        let r = put(&client, "s0", 1);
        let (hidden, _, handle) = read_back(&client, &r).unwrap();
        assert_eq!(hidden, sample(1).0);
        client.release(&handle).unwrap();

        let err = Client::connect_with(&uri, with(Some("wrong"), RoutePreference::Auto)).unwrap_err();
        assert!(matches!(err, Error::AuthFailed { .. }), "{err}");
        assert!(err.to_string().contains("wrong shared secret"), "{err}");
        let err = Client::connect_with(&uri, with(None, RoutePreference::Auto)).unwrap_err();
        assert!(matches!(err, Error::AuthFailed { .. }), "{err}");
        assert!(err.to_string().contains("requires a shared secret"), "{err}");
    }
    assert_eq!(daemon.handle.metrics().auth_failures(), 2);

    // A raw connection that skips Auth is refused and closed; so is a wrong answer.
    for meta in [None, Some(br#"{"client_nonce": "00", "response": "abcd"}"#.as_slice())] {
        let mut raw = UnixStream::connect(daemon.handle.unix_path().unwrap()).unwrap();
        raw.set_read_timeout(Some(DEADLINE)).unwrap();
        let hello = read_head(&mut raw, &Limits::default()).unwrap().unwrap();
        let hello: serde_json::Value = serde_json::from_slice(&hello.meta).unwrap();
        assert_eq!(hello["auth_required"], true);
        assert!(!hello.to_string().contains("s3cret"));
        let (op, meta) = match meta {
            Some(m) => (Op::Auth, m),
            None => (Op::Health, b"{}".as_slice()),
        };
        let header = Header { op, flags: 0, request_id: 1, meta_len: meta.len() as u32, payload_len: 0 };
        write_head(&mut raw, &header, meta, &[]).unwrap();
        let reply = read_head(&mut raw, &Limits::default()).unwrap().unwrap();
        assert!(reply.header.has(flags::ERROR));
        assert!(String::from_utf8_lossy(&reply.meta).contains("AuthFailed"));
        assert!(read_head(&mut raw, &Limits::default()).unwrap().is_none(), "the daemon closed the connection");
    }
    // The secret never crossed the wire in any test above: nothing but HMACs were sent.
}

#[test]
fn a_client_can_require_a_route() {
    let daemon = Daemon::start();
    let shm = ConnectOptions { route: RoutePreference::Shm, ..ConnectOptions::default() };
    assert_eq!(Client::connect_with(&daemon.unix(), shm.clone()).unwrap().route(), Route::Shm);
    let err = Client::connect_with(&daemon.tcp(), shm.clone()).unwrap_err();
    assert!(err.to_string().contains("shared-memory route was required"), "{err}");
    let err = Client::connect_with(&Daemon::mem().unix(), shm).unwrap_err();
    assert!(err.to_string().contains("does not offer it"), "{err}");
    let stream = ConnectOptions { route: RoutePreference::Stream, ..ConnectOptions::default() };
    assert_eq!(Client::connect_with(&daemon.unix(), stream).unwrap().route(), Route::Unix);
}

#[test]
fn borrowed_reads_are_zero_copy_views_that_an_abort_never_reuses() {
    let daemon = Daemon::with(StoreOptions { retain_on_release: true, ..StoreOptions::default() });
    let client = Client::connect(&daemon.unix()).unwrap();
    assert_eq!(client.route(), Route::Shm);
    let r = put(&client, "s0", 3);
    let first = client.get_borrowed(&r, None).unwrap();
    let second = client.get_borrowed(&r, Some(&["hidden"])).unwrap();
    let a = first.view("hidden").unwrap();
    let b = second.view("hidden").unwrap();
    assert_eq!(a.bytes(), sample(3).0.as_slice());
    assert_eq!(a.bytes().as_ptr(), b.bytes().as_ptr(), "both views are the same arena bytes: no copy");
    assert_eq!(first.view("input_ids").unwrap().bytes(), ids_bytes(&sample(3).1).as_slice());
    drop(second);

    // Another client aborts the sample and fills the arena: the borrowed view still shows its
    // own bytes (its region is pinned), while every new read is refused.
    let other = Client::connect(&daemon.tcp()).unwrap();
    other.abort(&SampleId::new("s0")).unwrap();
    assert!(matches!(read_back(&other, &r).unwrap_err(), Error::UseAfterFree { .. }));
    let big = vec![0xEEu8; 1 << 20];
    let mut refs = Vec::new();
    for i in 0..12 {
        let t = [("x", TensorView::new(ferry_core::DType::UInt8, &[1 << 20], &big).unwrap())];
        refs.push(other.put(&format!("fill{i}"), &t, JsonMap::new()).unwrap());
    }
    assert_eq!(first.view("hidden").unwrap().bytes(), sample(3).0.as_slice(), "a pinned region is never reused");
    let used_with_pin = daemon.arena_used();
    first.release().unwrap();
    assert!(daemon.arena_used() < used_with_pin, "the last unpin frees the aborted region");
    other.abort_all().unwrap();
    assert_eq!(daemon.arena_used(), 0);
    assert_eq!(daemon.active_leases(), 0);
}

#[test]
fn a_full_store_waits_for_room_then_fails_naming_capacity_and_residency() {
    let daemon = Daemon::start();
    let producer = Client::connect(&daemon.unix()).unwrap();
    let consumer = Client::connect(&daemon.tcp()).unwrap();
    let chunk = vec![7u8; 6 << 20];
    let shape = [6u64 << 20];
    let t = |b: &'static [u8]| [("x", TensorView::new(ferry_core::DType::UInt8, &shape, b).unwrap())];
    let chunk: &'static [u8] = chunk.leak();
    let r1 = producer.put("a", &t(chunk), JsonMap::new()).unwrap();
    let _r2 = producer.put("b", &t(chunk), JsonMap::new()).unwrap();
    // Full: a third does not fit. Without a deadline it fails at once, naming the numbers.
    let err = producer.put("c", &t(chunk), JsonMap::new()).unwrap_err();
    assert!(matches!(err, Error::OverBudget { .. }), "{err}");
    assert!(err.to_string().contains(&ARENA.to_string()), "names the capacity: {err}");
    assert!(err.to_string().contains(&(12u64 << 20).to_string()), "names the residency: {err}");
    // With a deadline it waits; a consumer frees room meanwhile.
    let freer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        let mut out = vec![0u8; 6 << 20];
        let h = consumer.get_into(&r1, &mut [("x", &mut out[..])]).unwrap();
        consumer.release(&h).unwrap();
        out
    });
    let started = Instant::now();
    producer.put_until("c", &t(chunk), JsonMap::new(), Instant::now() + DEADLINE).unwrap();
    assert!(started.elapsed() >= Duration::from_millis(40), "it waited for the release");
    assert_eq!(freer.join().unwrap(), chunk);
    // Nothing unacknowledged was evicted, and a put that cannot get room in time fails.
    let err = producer.put_until("d", &t(chunk), JsonMap::new(), Instant::now() + Duration::from_millis(30));
    assert!(matches!(err, Err(Error::OverBudget { .. })), "{err:?}");
    assert_eq!(daemon.handle.store().health().resident_samples, 2);
    let text = daemon.handle.render_metrics();
    assert!(text.contains("ferry_full_store_waits_total 1"), "{text}");
}

#[test]
fn metrics_are_served_over_http() {
    let mut daemon = Daemon::start();
    let addr = daemon.handle.serve_metrics("127.0.0.1:0".parse().unwrap()).unwrap();
    let shm = Client::connect(&daemon.unix()).unwrap();
    let tcp = Client::connect(&daemon.tcp()).unwrap();
    let r = put(&shm, "s0", 1);
    let (_, _, h) = read_back(&tcp, &r).unwrap();
    let fetch = |path: &str| {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body
    };
    let body = fetch("/metrics");
    assert!(body.starts_with("HTTP/1.0 200") || body.starts_with("HTTP/1.1 200"), "{body}");
    for want in [
        "ferry_puts_total{route=\"shm\"} 1",
        "ferry_gets_total{route=\"tcp\"} 1",
        "ferry_active_leases 1",
        "ferry_resident_samples 1",
        "ferry_pending_removals 0",
        "ferry_connections 2",
    ] {
        assert!(body.contains(want), "{want} missing from {body}");
    }
    assert!(fetch("/other").contains(" 404 "));
    tcp.release(&h).unwrap();
}

// ---------------------------------------------------------------------- processes

fn spawn_child(role: &str, uri: &str, sid: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_role", "--nocapture", "--test-threads=1"])
        .env("FERRY_NET_CHILD", role)
        .env("FERRY_NET_URI", uri)
        .env("FERRY_NET_SID", sid)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// Reads the child's stdout until a line starting with `want`.
fn expect_line(child: &mut Child, want: &str) -> String {
    let stdout = child.stdout.as_mut().unwrap();
    let mut reader = BufReader::new(stdout);
    let mut line = String::new();
    let mut seen = String::new();
    loop {
        line.clear();
        assert!(reader.read_line(&mut line).unwrap() > 0, "child ended before printing {want}; it printed: {seen}");
        seen.push_str(&line);
        // libtest prints "test child_role ... " before the child's own output.
        if let Some(at) = line.find(want) {
            return line[at + want.len()..].trim().to_owned();
        }
    }
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(start.elapsed() < DEADLINE, "child did not exit");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The child side of the process tests (a no-op in a normal test run).
#[test]
fn child_role() {
    let Ok(role) = std::env::var("FERRY_NET_CHILD") else { return };
    let uri = std::env::var("FERRY_NET_URI").unwrap();
    let sid = std::env::var("FERRY_NET_SID").unwrap();
    let client = Client::connect(&uri).unwrap();
    match role.as_str() {
        "produce" => {
            let r = put(&client, &sid, 9);
            println!("\nREF {}", serde_json::to_string(&r).unwrap());
        }
        "hold" => {
            let r: ferry_core::SampleRef = serde_json::from_str(&std::env::var("FERRY_NET_REF").unwrap()).unwrap();
            let (_, _, _handle) = read_back(&client, &r).unwrap();
            println!("\nLEASED");
            // Block until killed.
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
        }
        other => panic!("unknown child role {other}"),
    }
}

#[test]
fn a_producer_process_may_exit_before_its_samples_are_read() {
    let daemon = Daemon::start();
    let mut producer = spawn_child("produce", &daemon.unix(), "run0:task0");
    let r: ferry_core::SampleRef = serde_json::from_str(&expect_line(&mut producer, "REF")).unwrap();
    assert!(wait_exit(&mut producer).success());
    let consumer = Client::connect(&daemon.tcp()).unwrap();
    let (hidden, ids, handle) = read_back(&consumer, &r).unwrap();
    assert_eq!(hidden, sample(9).0);
    assert_eq!(ids, ids_bytes(&sample(9).1));
    consumer.release(&handle).unwrap();
    assert_eq!(daemon.handle.store().health().resident_samples, 0);
}

#[test]
fn a_sigkilled_clients_leases_are_released() {
    let daemon = Daemon::with(StoreOptions { retain_on_release: true, ..StoreOptions::default() });
    let producer = Client::connect(&daemon.tcp()).unwrap();
    let r = put(&producer, "s0", 8);
    let mut holder = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_role", "--nocapture", "--test-threads=1"])
        .env("FERRY_NET_CHILD", "hold")
        .env("FERRY_NET_URI", daemon.unix())
        .env("FERRY_NET_SID", "s0")
        .env("FERRY_NET_REF", serde_json::to_string(&r).unwrap())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    expect_line(&mut holder, "LEASED");
    assert_eq!(daemon.active_leases(), 1);
    holder.kill().unwrap(); // SIGKILL
    wait_exit(&mut holder);
    wait_until("the killed client's lease", || daemon.active_leases() == 0);
    // Its shared-memory pin went with the lease: the region is freed once the sample is.
    producer.abort(&SampleId::new("s0")).unwrap();
    assert_eq!(daemon.arena_used(), 0, "a killed client's pins are released");
}

/// A daemon that dies in the middle of a reply's payload (simulated deterministically: a fake
/// daemon that greets, authenticates, then sends half of a Get's payload and closes).
#[test]
fn a_daemon_dying_mid_transfer_gives_a_clear_error_never_partial_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fake.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let real = Daemon::start();
    let r = put(&Client::connect(&real.tcp()).unwrap(), "s0", 1);
    let fake = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let hello = br#"{"version":1,"store_id":"daemon","max_payload":1000000,"challenge":"00","auth_required":false,"shm":false}"#;
        let h = Header { op: Op::Hello, flags: 0, request_id: 0, meta_len: hello.len() as u32, payload_len: 0 };
        write_head(&mut s, &h, hello, &[]).unwrap();
        let auth = read_head(&mut s, &Limits::default()).unwrap().unwrap();
        let h = Header {
            op: Op::Auth,
            flags: flags::REPLY,
            request_id: auth.header.request_id,
            meta_len: 2,
            payload_len: 0,
        };
        write_head(&mut s, &h, b"{}", &[]).unwrap();
        let get = read_head(&mut s, &Limits::default()).unwrap().unwrap();
        let meta = serde_json::to_vec(&serde_json::json!({
            "handle": {"sample_id": "s0", "generation": 1, "lease_token": "t"},
            "tensors": [{"name": "hidden", "dtype": "bfloat16", "shape": [1, 4, 8]},
                        {"name": "input_ids", "dtype": "int64", "shape": [4]}],
            "route": "unix",
        }))
        .unwrap();
        let h = Header {
            op: Op::Get,
            flags: flags::REPLY,
            request_id: get.header.request_id,
            meta_len: meta.len() as u32,
            payload_len: 96,
        };
        let mut head = h.encode().to_vec();
        head.extend_from_slice(&meta);
        head.extend_from_slice(&[0xAB; 40]); // 40 of 96 payload bytes, then death
        s.write_all(&head).unwrap();
    });
    let options = ConnectOptions { route: RoutePreference::Stream, ..ConnectOptions::default() };
    let client = Client::connect_with(&format!("ferry+unix://{}", path.display()), options).unwrap();
    let err = read_back(&client, &r).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "a connection error, never partial data: {err}");
    assert!(err.to_string().contains("closed") || err.to_string().contains("failed to fill"), "{err}");
    fake.join().unwrap();
    let again = read_back(&client, &r).unwrap_err();
    assert!(again.to_string().contains("connect again"), "{again}");
}
