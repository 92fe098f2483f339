//! Which raw keys each draft strategy's offline feature files hold: the loader's strategy
//! registry is the one source of truth, so adding a strategy there makes `ferry ingest` accept it.

use anyhow::Result;
use ferry_loader::strategies::StrategyRegistry;

/// The raw keys an offline file of `strategy` must hold, in SpecForge's order.
pub(crate) fn offline_raw_keys(strategy: &str) -> Result<Vec<String>> {
    let registry = StrategyRegistry::builtin();
    Ok(registry.get(strategy)?.offline_raw_keys.iter().map(|k| (*k).to_owned()).collect())
}

/// The strategies (other than `current`) whose offline raw keys are all among `present`: what to
/// suggest for `--strategy` when a file lacks `current`'s keys.
pub(crate) fn strategies_holding(present: &[String], current: &str) -> Vec<&'static str> {
    let registry = StrategyRegistry::builtin();
    registry
        .names()
        .filter(|name| *name != current)
        .filter(|name| {
            registry.get(name).is_ok_and(|s| s.offline_raw_keys.iter().all(|k| present.iter().any(|p| p == k)))
        })
        .collect()
}
