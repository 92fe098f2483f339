//! Which raw keys each draft strategy's offline feature files hold: the loader's strategy
//! registry is the one source of truth, so adding a strategy there makes `ferry ingest` accept it.

use anyhow::Result;
use ferry_loader::strategies::StrategyRegistry;

/// The raw keys an offline file of `strategy` must hold, in SpecForge's order.
pub(crate) fn offline_raw_keys(strategy: &str) -> Result<Vec<String>> {
    let registry = StrategyRegistry::builtin();
    Ok(registry.get(strategy)?.offline_raw_keys.iter().map(|k| (*k).to_owned()).collect())
}
