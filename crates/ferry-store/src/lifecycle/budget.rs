//! The resident-byte budget: admission of a put is one atomic decision (reserve or refuse),
//! made before anything is written, so a refused put leaves residency unchanged. A put with a
//! deadline waits for bytes to be freed instead of failing at once (never evicting anything).

use ferry_core::{Error, Result};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct BudgetState {
    /// Bytes of generations this store wrote or adopted that are still physically present
    /// (including removals that failed and are pending).
    pub(crate) resident: u64,
    /// Bytes admitted for puts that are still writing.
    pub(crate) reserved: u64,
}

pub(crate) struct Budget {
    pub(crate) cap: Option<u64>,
    state: Mutex<BudgetState>,
    freed: Condvar,
}

/// Admitted bytes of one put; returned to the budget on drop unless committed.
pub(crate) struct Reservation<'a> {
    budget: &'a Budget,
    bytes: u64,
}

impl Reservation<'_> {
    /// Turns the reservation into resident bytes.
    pub(crate) fn commit(mut self) {
        let bytes = std::mem::take(&mut self.bytes);
        let mut s = self.budget.lock();
        s.reserved -= bytes;
        s.resident = s.resident.saturating_add(bytes);
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget.lock().reserved -= self.bytes;
            self.budget.freed.notify_all();
        }
    }
}

impl Budget {
    pub(crate) fn new(cap: Option<u64>) -> Self {
        Budget { cap, state: Mutex::new(BudgetState::default()), freed: Condvar::new() }
    }

    fn lock(&self) -> MutexGuard<'_, BudgetState> {
        // The state is two counters updated in single statements: a panic elsewhere cannot
        // leave it half-written, so a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn snapshot(&self) -> BudgetState {
        *self.lock()
    }

    /// Admits `bytes`, waiting until `deadline` (if any) for room. Never evicts.
    pub(crate) fn admit(&self, store_id: &str, bytes: u64, deadline: Option<Instant>) -> Result<Reservation<'_>> {
        let mut s = self.lock();
        if let Some(cap) = self.cap {
            // Saturating: adopted refs can claim any size; a sum must never wrap or panic.
            let over = |s: &BudgetState| s.resident.saturating_add(s.reserved).saturating_add(bytes) > cap;
            let refuse = |s: &BudgetState| Error::OverBudget {
                store_id: store_id.to_owned(),
                requested: bytes,
                resident: s.resident.saturating_add(s.reserved),
                budget: cap,
            };
            if bytes > cap {
                return Err(refuse(&s)); // can never fit: do not wait
            }
            while over(&s) {
                let Some(deadline) = deadline else { return Err(refuse(&s)) };
                let now = Instant::now();
                if now >= deadline {
                    return Err(refuse(&s));
                }
                s = self.freed.wait_timeout(s, deadline - now).map(|(g, _)| g).unwrap_or_else(|p| p.into_inner().0);
            }
        }
        s.reserved += bytes;
        Ok(Reservation { budget: self, bytes })
    }

    /// Counts bytes that became resident without admission (adopted samples).
    pub(crate) fn add_resident(&self, bytes: u64) {
        let mut s = self.lock();
        s.resident = s.resident.saturating_add(bytes);
    }

    /// Returns freed bytes to the budget and wakes waiting puts.
    pub(crate) fn release(&self, bytes: u64) {
        if bytes == 0 {
            return;
        }
        {
            let mut s = self.lock();
            s.resident = s.resident.saturating_sub(bytes);
        }
        self.freed.notify_all();
    }
}
