//! Torch's `.data/serialization_id` record, computed the way `PyTorchStreamWriter` computes it,
//! so that ferry's files are byte-identical to torch's.
//!
//! The id is 40 decimal digits: a 20-digit, zero-padded `u64` that folds (`hash_combine`) the
//! `std::hash<std::string>` of every record name, iterated in the order of the
//! `std::unordered_set<std::string>` torch keeps them in; then 20 digits of the
//! `hash_combine` of every data descriptor's CRC-32 (see `zip::ZipWriter`). Reproducing it means
//! reproducing libstdc++ on 64-bit Linux: `_Hash_bytes` (MurmurHash2-64A variant, seed
//! `0xc70f6907`) and the iteration order of its hash table (prime bucket counts, insertion at a
//! bucket's head, the rehash policy). Torch never checks the id when loading; it only has to be
//! 40 digits. This was checked against every fixture written by torch 2.15.

use crate::zip::hash_combine;

/// libstdc++'s `std::_Hash_bytes` for 64-bit `size_t`.
pub(crate) fn hash_bytes(bytes: &[u8]) -> u64 {
    const SEED: u64 = 0xc70f_6907;
    const MUL: u64 = (0xc6a4_a793u64 << 32) + 0x5bd1_e995;
    fn shift_mix(v: u64) -> u64 {
        v ^ (v >> 47)
    }
    let mut hash = SEED ^ (bytes.len() as u64).wrapping_mul(MUL);
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        let data = shift_mix(u64::from_le_bytes(b).wrapping_mul(MUL)).wrapping_mul(MUL);
        hash ^= data;
        hash = hash.wrapping_mul(MUL);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let data = rest.iter().rev().fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
        hash ^= data;
        hash = hash.wrapping_mul(MUL);
    }
    hash = shift_mix(hash).wrapping_mul(MUL);
    shift_mix(hash)
}

/// `__fast_bkt` of libstdc++'s prime rehash policy.
const FAST_BUCKETS: [u64; 14] = [2, 2, 2, 3, 5, 5, 7, 7, 11, 11, 11, 11, 13, 13];

/// The start of libstdc++'s `__prime_list` (hashtable-aux.cc). Bucket counts come from it from
/// index 6 on; this covers tables of up to ~1.5 million records, far beyond any torch file ferry
/// writes (7 records plus one per tensor). Beyond it the id stays valid but may differ from
/// torch's.
const PRIMES: &[u64] = &[
    2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89, 97, 103, 109, 113, 127,
    137, 139, 149, 157, 167, 179, 193, 199, 211, 227, 241, 257, 277, 293, 313, 337, 359, 383, 409, 439, 467, 503, 541,
    577, 619, 661, 709, 761, 823, 887, 953, 1031, 1109, 1193, 1289, 1381, 1493, 1613, 1741, 1879, 2029, 2179, 2357,
    2549, 2753, 2971, 3209, 3469, 3739, 4027, 4349, 4703, 5087, 5503, 5953, 6427, 6949, 7517, 8123, 8783, 9497, 10273,
    11113, 12011, 12983, 14033, 15173, 16411, 17749, 19183, 20753, 22447, 24281, 26267, 28411, 30727, 33223, 35933,
    38873, 42043, 45481, 49201, 53201, 57557, 62233, 67307, 72817, 78779, 85229, 92203, 99733, 107897, 116731, 126271,
    136607, 147793, 159871, 172933, 187091, 202409, 218971, 236897, 256279, 277261, 299951, 324503, 351061, 379787,
    410857, 444487, 480881, 520241, 562841, 608903, 658753, 712697, 771049, 834181, 902483, 976369, 1056323, 1142821,
    1236397, 1337629, 1447153, 1565659,
];

/// Where a bucket's "before first node" pointer points.
#[derive(Clone, Copy)]
enum Prev {
    BeforeBegin,
    Node(usize),
}

const NIL: usize = usize::MAX;

/// The node layout of libstdc++'s `_Hashtable` for unique keys with cached hash codes, enough to
/// reproduce its iteration order.
struct Table {
    buckets: Vec<Option<Prev>>,
    head: usize,
    next: Vec<usize>,
    hash: Vec<u64>,
    next_resize: u64,
}

impl Table {
    fn new() -> Table {
        Table { buckets: vec![None], head: NIL, next: Vec::new(), hash: Vec::new(), next_resize: 0 }
    }

    fn bucket_of(&self, node: usize) -> usize {
        (self.hash[node] % self.buckets.len() as u64) as usize
    }

    fn next_of(&self, p: Prev) -> usize {
        match p {
            Prev::BeforeBegin => self.head,
            Prev::Node(i) => self.next[i],
        }
    }

    fn set_next(&mut self, p: Prev, v: usize) {
        match p {
            Prev::BeforeBegin => self.head = v,
            Prev::Node(i) => self.next[i] = v,
        }
    }

    /// `_Prime_rehash_policy::_M_next_bkt`.
    fn next_bucket_count(&mut self, n: u64) -> u64 {
        if let Some(&fast) = FAST_BUCKETS.get(n as usize) {
            if n == 0 {
                return 1;
            }
            self.next_resize = fast;
            return fast;
        }
        let candidates = &PRIMES[6..];
        let i = candidates.partition_point(|&p| p < n).min(candidates.len() - 1);
        self.next_resize = candidates[i];
        candidates[i]
    }

    /// `_Prime_rehash_policy::_M_need_rehash` for one insertion.
    fn need_rehash(&mut self) -> Option<u64> {
        let elements = self.hash.len() as u64;
        let buckets = self.buckets.len() as u64;
        if elements + 1 > self.next_resize {
            let min_buckets = (elements + 1).max(if self.next_resize == 0 { 11 } else { 0 });
            if min_buckets >= buckets {
                return Some(self.next_bucket_count((min_buckets + 1).max(buckets * 2)));
            }
            self.next_resize = buckets;
        }
        None
    }

    /// `_M_rehash_aux` for unique keys.
    fn rehash(&mut self, count: u64) {
        let mut buckets: Vec<Option<Prev>> = vec![None; count as usize];
        let mut p = self.head;
        self.head = NIL;
        let mut begin_bucket = 0usize;
        while p != NIL {
            let next = self.next[p];
            let b = (self.hash[p] % count) as usize;
            match buckets[b] {
                None => {
                    self.next[p] = self.head;
                    self.head = p;
                    buckets[b] = Some(Prev::BeforeBegin);
                    if self.next[p] != NIL {
                        buckets[begin_bucket] = Some(Prev::Node(p));
                    }
                    begin_bucket = b;
                }
                Some(prev) => {
                    let after = match prev {
                        Prev::BeforeBegin => self.head,
                        Prev::Node(i) => self.next[i],
                    };
                    self.next[p] = after;
                    match prev {
                        Prev::BeforeBegin => self.head = p,
                        Prev::Node(i) => self.next[i] = p,
                    }
                }
            }
            p = next;
        }
        self.buckets = buckets;
    }

    /// `_M_insert_unique_node` then `_M_insert_bucket_begin`.
    fn insert(&mut self, hash: u64) {
        if let Some(count) = self.need_rehash() {
            self.rehash(count);
        }
        let node = self.hash.len();
        self.hash.push(hash);
        self.next.push(NIL);
        let b = self.bucket_of(node);
        match self.buckets[b] {
            Some(prev) => {
                let after = self.next_of(prev);
                self.next[node] = after;
                self.set_next(prev, node);
            }
            None => {
                self.next[node] = self.head;
                self.head = node;
                if self.next[node] != NIL {
                    let nb = self.bucket_of(self.next[node]);
                    self.buckets[nb] = Some(Prev::Node(node));
                }
                self.buckets[b] = Some(Prev::BeforeBegin);
            }
        }
    }

    fn iteration_order(&self) -> Vec<u64> {
        let mut out = Vec::with_capacity(self.hash.len());
        let mut p = self.head;
        while p != NIL {
            out.push(self.hash[p]);
            p = self.next[p];
        }
        out
    }
}

/// The serialization id for records named `names` (in write order, without the archive prefix)
/// whose data descriptors combined to `combined_crc`.
pub(crate) fn serialization_id(names: &[String], combined_crc: u64) -> String {
    let mut table = Table::new();
    for name in names {
        table.insert(hash_bytes(name.as_bytes()));
    }
    let names_hash = table.iteration_order().into_iter().fold(0u64, hash_combine);
    format!("{names_hash:020}{combined_crc:020}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_bytes_matches_libstdcxx_shape() {
        // Lengths around the 8-byte block boundary all take distinct paths.
        let hashes: std::collections::HashSet<u64> =
            (0..20).map(|n| hash_bytes(&b"abcdefghijklmnopqrstuvwxyz"[..n])).collect();
        assert_eq!(hashes.len(), 20);
    }

    #[test]
    fn id_is_forty_digits() {
        let names: Vec<String> = (0..100).map(|i| format!("data/{i}")).collect();
        let id = serialization_id(&names, u64::MAX);
        assert_eq!(id.len(), 40);
        assert!(id.bytes().all(|b| b.is_ascii_digit()));
    }
}
