//! Source-side views over the daemon: a client asks for part of a feature (a narrow, a
//! tensor-parallel shard) and the daemon derives it where the bytes are. Checked on every
//! route (TCP, the Unix stream, shared memory) and on a daemon without an arena: the bytes are
//! the view's by definition, only the view's bytes are served (the daemon's byte counter), a
//! bad view is refused before any lease is taken, and a view read is a read like any other
//! (consume-once frees the sample, an abort refuses it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use ferry_core::{DType, Error, JsonMap, SampleRef, TensorView, ViewSpec};
use ferry_net::{Client, ConnectOptions, DaemonConfig, DaemonHandle, RoutePreference};
use ferry_store::{StoreOptions, open_store};

/// A `[8, 6, 4]` float32 weight with distinct bytes.
const SHAPE: [u64; 3] = [8, 6, 4];

fn weight() -> Vec<u8> {
    (0..SHAPE.iter().product::<u64>() as usize * 4).map(|i| (i * 31 + 7) as u8).collect()
}

/// The view by definition: every element whose index on `dim` lies in the range, row-major.
fn expected(bytes: &[u8], dim: usize, start: u64, length: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for (flat, element) in bytes.chunks_exact(4).enumerate() {
        let mut rest = flat as u64;
        let mut index = [0u64; 3];
        for i in (0..3).rev() {
            index[i] = rest % SHAPE[i];
            rest /= SHAPE[i];
        }
        if (start..start + length).contains(&index[dim]) {
            out.extend_from_slice(element);
        }
    }
    out
}

struct Daemon {
    handle: DaemonHandle,
    _dir: tempfile::TempDir,
}

impl Daemon {
    /// A daemon over an arena (or the in-memory backend), keeping samples after a release
    /// (offline data, read many times) or freeing them (consume-once).
    fn start(arena: bool, retain_on_release: bool) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let options = StoreOptions { store_id: Some("views".into()), retain_on_release, ..StoreOptions::default() };
        let mut config = DaemonConfig::new(Some("127.0.0.1:0".parse().unwrap()), Some(dir.path().join("ferry.sock")));
        let store = if arena {
            let (store, backend) = ferry_net::arena_store(16 << 20, options).unwrap();
            config.arena = Some(backend);
            store
        } else {
            open_store("mem://views", options).unwrap()
        };
        Daemon { handle: ferry_net::start(store, config).unwrap(), _dir: dir }
    }

    /// Clients over every route this daemon offers, named.
    fn clients(&self) -> Vec<(&'static str, Client)> {
        let unix = format!("ferry+unix://{}", self.handle.unix_path().unwrap().display());
        let stream = ConnectOptions { route: RoutePreference::Stream, ..ConnectOptions::default() };
        let mut out = vec![
            ("tcp", Client::connect(&format!("ferry://{}", self.handle.tcp_addr().unwrap())).unwrap()),
            ("unix", Client::connect_with(&unix, stream).unwrap()),
        ];
        let auto = Client::connect(&unix).unwrap();
        if auto.route() == ferry_net::Route::Shm {
            out.push(("shm", auto));
        }
        out
    }

    fn served_bytes(&self) -> u64 {
        let text = self.handle.render_metrics();
        text.lines()
            .filter(|l| l.starts_with("ferry_get_bytes_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }
}

fn put(client: &Client, id: &str, bytes: &[u8]) -> SampleRef {
    let view = TensorView::new(DType::Float32, &SHAPE, bytes).unwrap();
    let ids = TensorView::new(DType::Int64, &[2], &[0u8; 16]).unwrap();
    client.put(id, &[("w", view), ("ids", ids)], JsonMap::new()).unwrap()
}

#[test]
fn every_narrow_on_every_route_is_the_views_bytes_and_only_they_are_served() {
    let bytes = weight();
    for arena in [true, false] {
        let daemon = Daemon::start(arena, true);
        let clients = daemon.clients();
        assert_eq!(clients.len(), if arena { 3 } else { 2 });
        for (route, client) in &clients {
            let r = put(client, &format!("{route}-w"), &bytes);
            for dim in 0..3 {
                for (start, length) in [(0, 1), (1, 2), (0, SHAPE[dim]), (SHAPE[dim] - 1, 1)] {
                    let view = ViewSpec::narrow(dim as u32, start, length);
                    let want = expected(&bytes, dim, start, length);
                    let served = daemon.served_bytes();
                    let mut out = vec![0u8; want.len()];
                    let h = client.get_views_into(&r, &mut [("w", view, &mut out[..])]).unwrap();
                    client.release(&h).unwrap();
                    assert_eq!(out, want, "{route} arena={arena} {}", view.view_id());
                    assert_eq!(daemon.served_bytes() - served, want.len() as u64, "{route}: only the view's bytes");
                    let (tensors, h) = client.get_views(&r, &[("w", view)]).unwrap();
                    client.release(&h).unwrap();
                    let t = &tensors["w"];
                    let mut shape = SHAPE.to_vec();
                    shape[dim] = length;
                    assert_eq!((t.dtype(), t.shape(), t.bytes()), (DType::Float32, &shape[..], &want[..]));
                }
            }
            // A tensor-parallel shard: rank 2 of 4 of dimension 0 (column-parallel).
            let shard = ViewSpec::shard(0, 2, 4, SHAPE[0]).unwrap();
            let (tensors, h) = client.get_views(&r, &[("w", shard)]).unwrap();
            client.release(&h).unwrap();
            assert_eq!(tensors["w"].bytes(), &expected(&bytes, 0, 4, 2)[..]);
            client.abort(&r.sample_id).unwrap();
        }
        assert_eq!(daemon.handle.store().health().active_leases, 0);
    }
}

#[test]
fn a_bad_view_is_refused_before_any_lease() {
    let daemon = Daemon::start(true, false);
    for (route, client) in daemon.clients() {
        let r = put(&client, &format!("{route}-bad"), &weight());
        for (view, want) in [
            (ViewSpec::narrow(3, 0, 1), "has 3 dimensions"),
            (ViewSpec::narrow(1, 5, 2), "has 6 indices"),
            (ViewSpec::narrow(0, 0, 0), "at least one index"),
        ] {
            let err = client.get_views(&r, &[("w", view)]).unwrap_err().to_string();
            assert!(err.contains(want) && err.contains("\"w\""), "{route}: {err}");
        }
        let mut small = [0u8; 8];
        let err = client.get_views_into(&r, &mut [("w", ViewSpec::narrow(0, 0, 1), &mut small[..])]).unwrap_err();
        assert!(err.to_string().contains("needs 96"), "{route}: {err}");
        let err = client.get_views(&r, &[("nope", ViewSpec::narrow(0, 0, 1))]).unwrap_err();
        assert!(matches!(err, Error::NotFound { .. }), "{route}: a feature the sample lacks: {err}");
        let mut spec_less = r.clone();
        spec_less.feature_specs.shift_remove("w");
        let err = client.get_views(&spec_less, &[("w", ViewSpec::narrow(0, 0, 1))]).unwrap_err();
        assert!(err.to_string().contains("needs its spec"), "{route}: {err}");
        assert_eq!(daemon.handle.store().health().active_leases, 0, "{route}: no lease was taken");
        client.abort(&r.sample_id).unwrap();
    }
}

#[test]
fn the_daemon_refuses_a_bad_view_the_client_did_not_check() {
    // A client that skips the local check (an older or foreign client) gets the daemon's
    // refusal, and no lease; the daemon plans views against the ref, as it plans reads.
    for arena in [true, false] {
        let daemon = Daemon::start(arena, false);
        let tcp = Client::connect(&format!("ferry://{}", daemon.handle.tcp_addr().unwrap())).unwrap();
        let r = put(&tcp, "raw", &weight());
        let addr = daemon.handle.tcp_addr().unwrap();
        let narrow = r#"{"w":{"kind":"narrow","dim":0,"start":7,"length":2}}"#;
        let reply = raw_get_with_views(addr, &r, r#"["w"]"#, narrow);
        assert!(reply.contains("has 8 indices"), "arena={arena}: {reply}");
        let reply =
            raw_get_with_views(addr, &r, r#"["w"]"#, r#"{"ids":{"kind":"narrow","dim":0,"start":0,"length":1}}"#);
        assert!(reply.contains("does not read"), "arena={arena}: a view of a feature not read: {reply}");
        let fine = r#"{"w":{"kind":"narrow","dim":0,"start":0,"length":1}}"#;
        let reply = raw_get_with_views(addr, &r, r#"["w","w"]"#, fine);
        assert!(reply.contains("twice"), "arena={arena}: one view per feature: {reply}");
        assert_eq!(daemon.handle.store().health().active_leases, 0, "arena={arena}");
        assert_eq!(daemon.handle.store().health().resident_samples, 1, "arena={arena}: nothing was consumed");
    }
}

/// Sends a raw `Get` of `names` with `views` (both JSON) on a fresh connection after the
/// handshake (the test daemon has no secret); returns the reply's metadata as text.
fn raw_get_with_views(addr: std::net::SocketAddr, r: &SampleRef, names: &str, views: &str) -> String {
    use ferry_net::frame::{Header, Limits, Op, read_head, write_head};
    let limits = Limits::default();
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    let _hello = read_head(&mut stream, &limits).unwrap().unwrap();
    let auth = br#"{"client_nonce": "00"}"#;
    let h = Header { op: Op::Auth, flags: 0, request_id: 1, meta_len: auth.len() as u32, payload_len: 0 };
    write_head(&mut stream, &h, auth, &[]).unwrap();
    let _ok = read_head(&mut stream, &limits).unwrap().unwrap();
    let r = ferry_core::json::sample_ref_to_string(r, ferry_core::json::JsonStyle::Compact).unwrap();
    let meta = format!(r#"{{"ref":{r},"names":{names},"shm":false,"views":{views}}}"#);
    let h = Header { op: Op::Get, flags: 0, request_id: 2, meta_len: meta.len() as u32, payload_len: 0 };
    write_head(&mut stream, &h, meta.as_bytes(), &[]).unwrap();
    let reply = read_head(&mut stream, &limits).unwrap().unwrap();
    String::from_utf8(reply.meta).unwrap()
}

#[test]
fn a_view_read_is_a_read_consume_once_frees_and_an_abort_refuses() {
    let daemon = Daemon::start(true, false);
    for (route, client) in daemon.clients() {
        let r = put(&client, &format!("{route}-once"), &weight());
        let (_, h) = client.get_views(&r, &[("w", ViewSpec::narrow(1, 0, 3))]).unwrap();
        client.release(&h).unwrap();
        let err = client.get_views(&r, &[("w", ViewSpec::narrow(1, 0, 3))]).unwrap_err();
        assert!(
            matches!(err, Error::NotFound { .. } | Error::StaleRef { .. } | Error::UseAfterFree { .. }),
            "{route}: {err}"
        );
        assert_eq!(daemon.handle.store().health().resident_samples, 0, "{route}: consume-once freed it");
        let r = put(&client, &format!("{route}-aborted"), &weight());
        client.abort(&r.sample_id).unwrap();
        assert!(client.get_views(&r, &[("w", ViewSpec::narrow(0, 0, 1))]).is_err(), "{route}: an aborted sample");
        assert_eq!(daemon.handle.store().health().active_leases, 0);
    }
}

#[test]
fn long_ranges_go_straight_from_the_arena_and_short_ones_gathered_with_the_same_bytes() {
    // [4, 4096] float32: a narrow of dimension 1 is 4 ranges of `length * 4` bytes, so 1024
    // columns make 4 KiB ranges (written from the arena as they are) and 16 columns 64-byte
    // ones (gathered by the daemon first): the bytes must not depend on which.
    let shape = [4u64, 4096];
    let bytes: Vec<u8> = (0..4 * 4096 * 4).map(|i: usize| (i * 13 + i / 4096) as u8).collect();
    let daemon = Daemon::start(true, true);
    for (route, client) in daemon.clients() {
        let view = TensorView::new(DType::Float32, &shape, &bytes).unwrap();
        let r = client.put(&format!("{route}-wide"), &[("w", view)], JsonMap::new()).unwrap();
        for (start, length) in [(1024, 1024), (3000, 16), (0, 4096)] {
            let spec = ViewSpec::narrow(1, start, length);
            let want: Vec<u8> = bytes
                .chunks_exact(4096 * 4)
                .flat_map(|row| &row[start as usize * 4..(start + length) as usize * 4])
                .copied()
                .collect();
            let (tensors, h) = client.get_views(&r, &[("w", spec)]).unwrap();
            client.release(&h).unwrap();
            assert_eq!(tensors["w"].bytes(), &want[..], "{route} {}", spec.view_id());
        }
        client.abort(&r.sample_id).unwrap();
    }
}

#[test]
fn a_get_of_several_features_views_some_and_reads_the_others_whole() {
    let bytes = weight();
    let ids: Vec<u8> = (0..16).collect();
    for arena in [true, false] {
        let daemon = Daemon::start(arena, true);
        for (route, client) in daemon.clients() {
            let w = TensorView::new(DType::Float32, &SHAPE, &bytes).unwrap();
            let i = TensorView::new(DType::Int64, &[2], &ids).unwrap();
            let w2 = TensorView::new(DType::Float32, &SHAPE, &bytes[..]).unwrap();
            let r = client.put(&format!("{route}-multi"), &[("ids", i), ("w", w), ("w2", w2)], JsonMap::new()).unwrap();
            let (a, b) = (ViewSpec::narrow(2, 1, 2), ViewSpec::narrow(0, 3, 4));
            let (got, h) = client.get_views(&r, &[("w", a), ("w2", b)]).unwrap();
            client.release(&h).unwrap();
            assert_eq!(got["w"].bytes(), &expected(&bytes, 2, 1, 2)[..], "{route} arena={arena}");
            assert_eq!(got["w2"].bytes(), &expected(&bytes, 0, 3, 4)[..], "{route} arena={arena}");
            // Views into the caller's buffers, in another order, with an unviewed feature read
            // alongside through get_into on the same lease rules.
            let (mut x, mut y) = (vec![0u8; 8 * 6 * 4], vec![0u8; 8 * 2 * 4 * 4]);
            let h = client
                .get_views_into(
                    &r,
                    &mut [("w2", ViewSpec::narrow(0, 0, 8), &mut y[..]), ("w", ViewSpec::narrow(1, 1, 1), &mut x[..])],
                )
                .unwrap_err();
            assert!(h.to_string().contains("is 256 bytes") && h.to_string().contains("needs 768"), "{h}");
            let mut y = vec![0u8; bytes.len()];
            let h = client
                .get_views_into(
                    &r,
                    &mut [
                        ("w2", ViewSpec::narrow(0, 0, 8), &mut y[..]),
                        ("w", ViewSpec::narrow(1, 1, 1), &mut x[..8 * 4 * 4]),
                    ],
                )
                .unwrap();
            client.release(&h).unwrap();
            assert_eq!(
                (&y[..], &x[..8 * 4 * 4]),
                (&bytes[..], &expected(&bytes, 1, 1, 1)[..]),
                "{route} arena={arena}"
            );
            let mut whole = vec![0u8; 16];
            let h = client.get_into(&r, &mut [("ids", &mut whole[..])]).unwrap();
            client.release(&h).unwrap();
            assert_eq!(whole, ids);
            // The same feature twice is refused before anything is asked.
            let err = client
                .get_views(&r, &[("w", ViewSpec::narrow(0, 0, 4)), ("w", ViewSpec::narrow(0, 4, 4))])
                .unwrap_err();
            assert!(err.to_string().contains("named twice"), "{err}");
            client.abort(&r.sample_id).unwrap();
        }
        assert_eq!(daemon.handle.store().health().active_leases, 0);
    }
}
