//! The daemon arena's fd passed in-process over a `UnixStream::pair()`: both sides see each
//! other's bytes through their own mappings, and a client-filled reservation reads back.
#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should panic

use ferry_core::{Generation, SampleId, StoreId};
use ferry_shm::{Arena, ArenaBackend, ArenaMap, ArenaOptions, recv_with_fd, send_with_fd};
use ferry_store::backend::{ByteBackend, SampleKey};
use std::os::unix::net::UnixStream;

const HELLO: &[u8; 16] = b"FERRYARENA\0\0\0\0\0\x01";

#[test]
fn client_maps_the_received_arena_and_shares_bytes_both_ways() {
    let arena = Arena::create("fdpass", 8 << 20, ArenaOptions::default()).unwrap();
    let backend = ArenaBackend::new(arena.clone());
    let (daemon_end, client_end) = UnixStream::pair().unwrap();

    arena.write_at(4096, b"from the daemon").unwrap();
    send_with_fd(&daemon_end, HELLO, arena.fd()).unwrap();

    let client = std::thread::spawn(move || {
        let mut msg = [0u8; 16];
        let (n, fd) = recv_with_fd(&client_end, &mut msg).unwrap();
        assert_eq!((n, &msg), (16, HELLO));
        let map = ArenaMap::map(fd.unwrap(), 8 << 20, true).unwrap();
        assert_eq!(map.slice(4096, 15).unwrap(), b"from the daemon");
        map.write_at(8192, b"from the client").unwrap();
        map
    });
    let map = client.join().unwrap();
    let mut seen = [0u8; 15];
    arena.read_at(8192, &mut seen).unwrap();
    assert_eq!(&seen, b"from the client");

    // Two-phase put where the client writes straight into the reserved region.
    let (store, sample) = (StoreId::new("st"), SampleId::new("s"));
    let key = SampleKey { store_id: &store, sample_id: &sample, generation: Generation::new(1) };
    let reservation = backend.reserve(key, &[("hidden", 1 << 20)], None).unwrap();
    let placed = reservation.objects()[0].clone();
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 253) as u8).collect();
    map.write_at(placed.offset, &data).unwrap();
    backend.publish(reservation).unwrap();
    let mut out = vec![0u8; 1 << 20];
    assert_eq!(backend.read_into(key.object("hidden"), &mut out).unwrap(), 1 << 20);
    assert_eq!(out, data);
    // And the client reads the daemon's published bytes zero-copy under a pin.
    let located = backend.locate(key, &["hidden"]).unwrap();
    assert_eq!(map.slice(located.objects[0].offset, 1 << 20).unwrap(), &data[..]);
    backend.unpin(located.pin).unwrap();
}
