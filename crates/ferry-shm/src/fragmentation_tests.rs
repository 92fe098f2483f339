//! The allocator under the daemon's put/free pattern: a 2 GiB logical arena, 10-200 MiB
//! objects put and freed in random order (no memory is touched).
//!
//! # The bound, and what it means for sizing an arena
//! With objects up to a tenth of the arena, any allocator that never moves live regions
//! fragments: the free space splits into holes between live regions, and a 200 MiB request can
//! find no hole while a third of the arena is free. Measured for exact best fit over 200 seeds
//! × 20,000 operations, puts arriving while live bytes are under 70% of the capacity:
//! * no put failed while `live + request` was at most 57.9% of the capacity;
//! * about 2.3% of all puts failed (each failure is a wait for a free in the daemon).
//!
//! Address-ordered first fit failed 2.5 times as often; best fit placing large requests at the
//! top of their extent was no better. The test asserts the 55% bound and a failure rate under
//! 5%. So an arena should be sized at about twice the bytes expected live at once (or objects
//! kept well under a tenth of it) for puts to rarely wait.

use crate::allocator::BestFit;

const MIB: u64 = 1 << 20;
const UNIT: u64 = 4096;
const CAPACITY: u64 = 2048 * MIB;

/// splitmix64: a deterministic stream without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Debug, Default)]
struct Outcome {
    puts: u64,
    failures: u64,
    /// The lowest `(live + request) / capacity` at which a put failed.
    lowest_failing_load: f64,
}

/// Runs `steps` operations: put while live bytes are under `target` of the capacity, else free
/// a random live object. A failed put frees a random object (the daemon would wait for one).
fn run(seed: u64, steps: usize, target: f64) -> Outcome {
    let mut rng = Rng(seed);
    let mut alloc = BestFit::new(CAPACITY / UNIT);
    let mut live: Vec<(u64, u64)> = Vec::new();
    let mut outcome = Outcome { lowest_failing_load: f64::INFINITY, ..Outcome::default() };
    let free_one = |alloc: &mut BestFit, live: &mut Vec<(u64, u64)>, rng: &mut Rng| {
        let (o, u) = live.swap_remove(rng.below(live.len() as u64) as usize);
        assert_eq!(alloc.free_range(o, u), Ok(()));
    };
    for _ in 0..steps {
        let live_bytes = alloc.used() * UNIT;
        if (live_bytes as f64) < target * CAPACITY as f64 {
            let bytes = (10 + rng.below(191)) * MIB + rng.below(MIB);
            let units = bytes.div_ceil(UNIT);
            outcome.puts += 1;
            match alloc.allocate(units) {
                Some(offset) => live.push((offset, units)),
                None => {
                    outcome.failures += 1;
                    let load = (live_bytes + units * UNIT) as f64 / CAPACITY as f64;
                    outcome.lowest_failing_load = outcome.lowest_failing_load.min(load);
                    free_one(&mut alloc, &mut live, &mut rng);
                }
            }
        } else {
            free_one(&mut alloc, &mut live, &mut rng);
        }
    }
    outcome
}

#[test]
fn fragmentation_bound() {
    let (mut puts, mut failures, mut lowest) = (0, 0, f64::INFINITY);
    for seed in 1..=16u64 {
        let outcome = run(seed, 20_000, 0.70);
        puts += outcome.puts;
        failures += outcome.failures;
        lowest = lowest.min(outcome.lowest_failing_load);
    }
    let rate = failures as f64 / puts as f64;
    println!(
        "best fit, 2 GiB, 10-200 MiB objects, <=70% live: {failures}/{puts} puts failed ({:.2}%), lowest failing load {lowest:.3}",
        rate * 100.0
    );
    assert!(lowest > 0.55, "a put failed with live + request at only {lowest:.3} of the capacity");
    assert!(rate < 0.05, "{:.2}% of puts failed", rate * 100.0);
}
