//! Property tests of the frame decoder: every valid header round-trips, arbitrary bytes never
//! panic and decode only to what re-encodes to the same bytes, lengths over their bounds are
//! refused before anything is allocated, a stream cut anywhere inside a frame is an error (and
//! between frames a clean end), and the payload is left in the stream for its destination.
#![allow(clippy::unwrap_used)]

use ferry_net::frame::{FrameHead, HEADER_LEN, Header, Limits, Op, flags, read_head, write_head};
use proptest::prelude::*;
use std::io::{Cursor, Read};

fn op() -> impl Strategy<Value = Op> {
    proptest::sample::select(Op::ALL.to_vec())
}

fn header(limits: Limits) -> impl Strategy<Value = Header> {
    (op(), 0u32..=flags::KNOWN, any::<u64>(), 0..=limits.max_meta, 0..=limits.max_payload).prop_map(
        |(op, flags, request_id, meta_len, payload_len)| Header { op, flags, request_id, meta_len, payload_len },
    )
}

const SMALL: Limits = Limits { max_meta: 4096, max_payload: 1 << 20 };

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn valid_headers_round_trip(h in header(Limits::default())) {
        prop_assert_eq!(Header::decode(&h.encode(), &Limits::default()).unwrap(), h);
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_decode_only_to_themselves(bytes in proptest::array::uniform32(any::<u8>())) {
        if let Ok(h) = Header::decode(&bytes, &Limits::default()) {
            prop_assert_eq!(h.encode(), bytes);
        }
    }

    #[test]
    fn corrupting_a_valid_header_never_panics(h in header(SMALL), at in 0..HEADER_LEN, byte in any::<u8>()) {
        let mut bytes = h.encode();
        bytes[at] = byte;
        match Header::decode(&bytes, &SMALL) {
            Ok(d) => prop_assert_eq!(d.encode(), bytes),
            Err(e) => prop_assert!(e.to_string().contains("ferry frame"), "{}", e),
        }
    }

    #[test]
    fn oversized_lengths_are_refused_naming_the_limit(h in header(SMALL), extra_meta in 1u32..1000, extra_payload in 1u64..1000) {
        let big_meta = Header { meta_len: SMALL.max_meta + extra_meta, ..h };
        let err = Header::decode(&big_meta.encode(), &SMALL).unwrap_err().to_string();
        prop_assert!(err.contains("exceeds the limit of 4096 bytes"), "{}", err);
        let big_payload = Header { payload_len: SMALL.max_payload + extra_payload, ..h };
        let err = Header::decode(&big_payload.encode(), &SMALL).unwrap_err().to_string();
        prop_assert!(err.contains("exceeds the limit of 1048576 bytes"), "{}", err);
    }

    #[test]
    fn frames_round_trip_through_a_stream_leaving_the_payload(
        op in op(),
        request_id in any::<u64>(),
        meta in proptest::collection::vec(any::<u8>(), 0..300),
        parts in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..4),
    ) {
        let payload_len = parts.iter().map(|p| p.len() as u64).sum();
        let h = Header { op, flags: flags::REPLY, request_id, meta_len: meta.len() as u32, payload_len };
        let slices: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        let mut wire = Vec::new();
        write_head(&mut wire, &h, &meta, &slices).unwrap();
        prop_assert_eq!(wire.len() as u64, HEADER_LEN as u64 + meta.len() as u64 + payload_len);

        let mut stream = Cursor::new(wire.clone());
        let head = read_head(&mut stream, &SMALL).unwrap().unwrap();
        prop_assert_eq!(&head, &FrameHead { header: h, meta: meta.clone() });
        let mut payload = vec![0u8; payload_len as usize];
        stream.read_exact(&mut payload).unwrap();
        prop_assert_eq!(payload, parts.concat());
        prop_assert!(read_head(&mut stream, &SMALL).unwrap().is_none(), "a clean end between frames");

        // Cut anywhere inside the header or metadata: an error, never a panic or a frame.
        for cut in 1..HEADER_LEN + meta.len() {
            let mut short = Cursor::new(&wire[..cut]);
            let err = read_head(&mut short, &SMALL).unwrap_err().to_string();
            prop_assert!(err.contains("stream ended"), "cut at {}: {}", cut, err);
        }
    }
}

#[test]
fn a_header_that_disagrees_with_its_slices_is_not_written() {
    let h = Header { op: Op::Put, flags: 0, request_id: 1, meta_len: 2, payload_len: 5 };
    let mut wire = Vec::new();
    let err = write_head(&mut wire, &h, b"{}", &[b"abcd"]).unwrap_err();
    assert!(err.to_string().contains("5 payload bytes but 2 and 4"), "{err}");
    assert!(wire.is_empty());
}

#[test]
fn specific_bad_frames_are_named() {
    let good = Header { op: Op::Ping, flags: 0, request_id: 1, meta_len: 0, payload_len: 0 }.encode();
    let cases: [(usize, u8, &str); 4] = [
        (0, b'X', "bad magic"),
        (4, 9, "protocol version 9"),
        (6, 99, "unknown op code 99"),
        (11, 0x80, "unknown flag bits"),
    ];
    for (at, byte, want) in cases {
        let mut bytes = good;
        bytes[at] = byte;
        let err = Header::decode(&bytes, &Limits::default()).unwrap_err().to_string();
        assert!(err.contains(want), "{want}: {err}");
    }
}
