//! The strategy registry: what each draft algorithm's samples hold and how they are collated.
//!
//! A [`Strategy`] is plain data, so adding an algorithm is one entry: its name, the raw keys its
//! offline feature files carry, how those raw keys are renamed to the feature names the trainer
//! sees, one [`FeatureRule`] per feature (where its token axis is, what pads it), and whether the
//! loader generates an attention mask. The loader never branches on a strategy's name.
//!
//! # Built-in entries
//!
//! | strategy | sample features (per sample) | batch features |
//! | --- | --- | --- |
//! | [`EAGLE3`] offline file | `input_ids` (L) int64, `loss_mask` (L) int64, `aux_hidden_state` (1, L, 3H) bf16, `hidden_state` (1, L, H) bf16 | `input_ids` (B, L), `loss_mask` (B, L), `hidden_state` (B, L, 3H) ← aux, `target` (B, L, H) ← last hidden, `attention_mask` (B, L) int64 |
//! | [`EAGLE3`] online capture | `input_ids`, `loss_mask`, `attention_mask` (1, L) int64, `hidden_state` (1, L, 3H), `target` (1, L, H) | the same names, padded |
//! | [`DFLASH`] | `input_ids`, `loss_mask` (1, L) int64, `hidden_states` (1, L, K·H) bf16 | `input_ids`, `loss_mask` (B, L), `hidden_states` (B, L, K·H), `attention_mask` (B, L) |
//! | [`DOMINO`] | DFlash's schema under its own name | as DFlash |
//!
//! In an EAGLE3 offline file the roles of the hidden states swap (SpecForge's offline EAGLE3
//! transform): the file's `aux_hidden_state` (the three capture layers) becomes the batch's
//! `hidden_state` (the draft's input) and the file's `hidden_state` (the last layer) becomes
//! `target`. Online refs already use the batch names.
//!
//! Offline samples are processed as SpecForge's offline datasets process them before collation:
//! every per-token feature is cut to `max_len` tokens, and for EAGLE3 the loss mask of the last
//! kept token is set to 0. Every sequence is then padded at the end of its token axis to the
//! longest sample in the batch.
//!
//! # Adding an algorithm
//!
//! One entry. A built-in one goes into [`BUILTIN`]; a caller can also register its own:
//!
//! ```
//! use ferry_loader::strategies::{AttentionMask, FeatureRule, PadValue, Strategy, StrategyRegistry};
//!
//! const MEDUSA: Strategy = Strategy {
//!     name: "medusa",
//!     offline_raw_keys: &["input_ids", "loss_mask", "hidden_state"],
//!     offline_renames: &[],
//!     features: &[
//!         FeatureRule::tokens("input_ids").pad(PadValue::Int(0)),
//!         FeatureRule::tokens("loss_mask"),
//!         FeatureRule::tokens("attention_mask").optional(),
//!         FeatureRule::token_rows("hidden_state"),
//!     ],
//!     attention_mask: AttentionMask::Generate { name: "attention_mask" },
//!     offline_cut_to_max_len: true,
//!     offline_zero_last: None,
//! };
//!
//! let mut registry = StrategyRegistry::builtin();
//! registry.register(MEDUSA).unwrap();
//! assert_eq!(registry.get("medusa").unwrap().name, "medusa");
//! assert!(registry.get("eagle2").unwrap_err().to_string().contains("eagle3, dflash, domino, medusa"));
//! ```

use ferry_core::{Error, JsonMap, Result};
use std::collections::HashSet;

/// Where a feature's token axis is, which decides how it is collated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One value per token: a sample holds `(L)` or `(1, L)`; the batch holds `(B, Lmax)`.
    Tokens,
    /// One row of width `D` per token: a sample holds `(L, D)` or `(1, L, D)`; the batch holds
    /// `(B, Lmax, D)`.
    TokenRows,
    /// No token axis: every sample has the same shape `S`; the batch stacks them as `(B, S...)`.
    Fixed,
}

/// The value written into padding positions (converted to the feature's dtype).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PadValue {
    /// All-zero bytes (0, 0.0, false) for every dtype.
    Zero,
    /// An integer (also allowed for float dtypes, converted exactly as `as` does).
    Int(i64),
    /// A float; only for float dtypes.
    Float(f64),
}

/// How one batch feature is collated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FeatureRule {
    /// The feature's name in the batch (after any offline rename).
    pub name: &'static str,
    /// Where its token axis is.
    pub layout: Layout,
    /// What pads it.
    pub pad: PadValue,
    /// Whether every sample must carry it.
    pub required: bool,
}

impl FeatureRule {
    /// A required per-token feature (`(L)` or `(1, L)`), zero-padded.
    pub const fn tokens(name: &'static str) -> Self {
        FeatureRule { name, layout: Layout::Tokens, pad: PadValue::Zero, required: true }
    }

    /// A required per-token row feature (`(L, D)` or `(1, L, D)`), zero-padded.
    pub const fn token_rows(name: &'static str) -> Self {
        FeatureRule { name, layout: Layout::TokenRows, pad: PadValue::Zero, required: true }
    }

    /// A required feature without a token axis, stacked.
    pub const fn fixed(name: &'static str) -> Self {
        FeatureRule { name, layout: Layout::Fixed, pad: PadValue::Zero, required: true }
    }

    /// The same rule for a feature samples may lack.
    pub const fn optional(self) -> Self {
        FeatureRule { required: false, ..self }
    }

    /// The same rule with another pad value.
    pub const fn pad(self, pad: PadValue) -> Self {
        FeatureRule { pad, ..self }
    }
}

/// Whether the loader makes an attention mask for samples that carry none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionMask {
    /// No mask is generated.
    None,
    /// When the samples carry no feature of this name, the batch gets one: `(B, Lmax)` int64,
    /// 1 for each real token and 0 for padding. Samples that carry it have it padded with their
    /// rule's pad value instead (declare a [`Layout::Tokens`] rule for it).
    Generate {
        /// The mask's feature name.
        name: &'static str,
    },
}

/// One draft algorithm's sample schema and collation rules. See the module doc.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Strategy {
    /// The name refs carry in `strategy` (`eagle3`, `dflash`, ...).
    pub name: &'static str,
    /// The keys an offline feature file of this algorithm holds; a sample in the offline
    /// layout must carry all of them.
    pub offline_raw_keys: &'static [&'static str],
    /// Raw key → batch feature name for samples in the offline layout, applied simultaneously
    /// (so two names may swap).
    pub offline_renames: &'static [(&'static str, &'static str)],
    /// One rule per batch feature. A feature without a rule is stacked as [`Layout::Fixed`].
    pub features: &'static [FeatureRule],
    /// Whether to generate an attention mask.
    pub attention_mask: AttentionMask,
    /// Whether samples in the offline layout are cut to `max_len` tokens (the loader's
    /// `max_len`, else the ref's `metadata.max_len`), as SpecForge's offline datasets cut them.
    pub offline_cut_to_max_len: bool,
    /// A per-token feature (batch name) whose value at an offline sample's last kept token is
    /// set to zero (SpecForge's EAGLE3 offline transform: `loss_mask[0, -1] = 0`, since the last
    /// token has no next token to predict).
    pub offline_zero_last: Option<&'static str>,
}

/// EAGLE3: see the module doc for its two layouts and the offline role swap.
pub const EAGLE3: Strategy = Strategy {
    name: "eagle3",
    // SpecForge's order (`OfflineManifestReader`): it is the key order of every offline ref.
    offline_raw_keys: &ferry_store::offline::EAGLE3_OFFLINE_KEYS,
    offline_renames: &[("aux_hidden_state", "hidden_state"), ("hidden_state", "target")],
    features: &[
        FeatureRule::tokens("input_ids"),
        FeatureRule::tokens("loss_mask"),
        FeatureRule::tokens("attention_mask").optional(),
        FeatureRule::token_rows("hidden_state"),
        FeatureRule::token_rows("target"),
    ],
    attention_mask: AttentionMask::Generate { name: "attention_mask" },
    offline_cut_to_max_len: true,
    offline_zero_last: Some("loss_mask"),
};

/// DFlash: `hidden_states` concatenates K target capture layers.
pub const DFLASH: Strategy = Strategy {
    name: "dflash",
    offline_raw_keys: &["input_ids", "loss_mask", "hidden_states"],
    offline_renames: &[],
    features: &[
        FeatureRule::tokens("input_ids"),
        FeatureRule::tokens("loss_mask"),
        FeatureRule::tokens("attention_mask").optional(),
        FeatureRule::token_rows("hidden_states"),
    ],
    attention_mask: AttentionMask::Generate { name: "attention_mask" },
    // SpecForge's DFlash offline processing cuts to max_len and keeps the loss mask as it is.
    offline_cut_to_max_len: true,
    offline_zero_last: None,
};

/// Domino: DFlash's schema under its own name.
pub const DOMINO: Strategy = Strategy { name: "domino", ..DFLASH };

/// The built-in strategies, in registry order. Adding an algorithm is one entry here.
pub const BUILTIN: &[Strategy] = &[EAGLE3, DFLASH, DOMINO];

impl Strategy {
    /// The rule for a batch feature, if the strategy declares one.
    pub fn rule(&self, batch_name: &str) -> Option<&FeatureRule> {
        self.features.iter().find(|r| r.name == batch_name)
    }

    /// Checks the entry is coherent: a name, no feature declared twice, no raw key renamed
    /// twice or to a name without a rule, and a carried attention mask declared as tokens.
    pub fn check(&self) -> Result<()> {
        let bad = |why: String| Err(Error::InvalidArgument(format!("strategy {:?}: {why}", self.name)));
        if self.name.is_empty() {
            return bad("the name is empty".into());
        }
        let mut seen = HashSet::new();
        if let Some(dup) = self.features.iter().find(|r| !seen.insert(r.name)) {
            return bad(format!("feature {:?} has two rules", dup.name));
        }
        let mut sources = HashSet::new();
        for (raw, batch) in self.offline_renames {
            if !sources.insert(*raw) {
                return bad(format!("raw key {raw:?} is renamed twice"));
            }
            if !self.offline_raw_keys.contains(raw) {
                return bad(format!("renamed key {raw:?} is not one of its offline raw keys"));
            }
            if self.rule(batch).is_none() {
                return bad(format!("raw key {raw:?} is renamed to {batch:?}, which has no feature rule"));
            }
        }
        if let Some(name) = self.offline_zero_last
            && self.rule(name).is_none_or(|r| r.layout != Layout::Tokens)
        {
            return bad(format!("its offline_zero_last feature {name:?} must have a Tokens rule"));
        }
        if let AttentionMask::Generate { name } = self.attention_mask
            && let Some(rule) = self.rule(name)
            && rule.layout != Layout::Tokens
        {
            return bad(format!("its attention mask {name:?} must have a Tokens rule"));
        }
        Ok(())
    }

    /// Whether a sample is in the offline layout: its metadata says `format: "offline_..."`
    /// (SpecForge's offline refs and ingested files), or it carries a raw key that only
    /// offline files have (a raw key that is not also a batch feature name, such as EAGLE3's
    /// `aux_hidden_state`).
    pub fn is_offline_sample<'n>(&self, metadata: &JsonMap, mut names: impl Iterator<Item = &'n str>) -> bool {
        let declared_offline =
            metadata.get("format").and_then(serde_json::Value::as_str).is_some_and(|f| f.starts_with("offline_"));
        declared_offline || names.any(|n| self.offline_raw_keys.contains(&n) && self.rule(n).is_none())
    }

    /// Maps one sample's store feature names to batch feature names: offline samples get the
    /// renames; every required feature must then be present. Returns `(batch name, store name)`
    /// pairs in the sample's order. Missing features are [`Error::NotFound`] naming them.
    pub fn map_features<'n>(
        &self,
        sample_id: &str,
        metadata: &JsonMap,
        store_names: &[&'n str],
    ) -> Result<Vec<(&'n str, &'n str)>> {
        let offline = self.is_offline_sample(metadata, store_names.iter().copied());
        let mut mapped: Vec<(&'n str, &'n str)> = Vec::with_capacity(store_names.len());
        if offline {
            let missing: Vec<&str> =
                self.offline_raw_keys.iter().copied().filter(|k| !store_names.contains(k)).collect();
            if !missing.is_empty() {
                return Err(Error::NotFound {
                    what: format!(
                        "offline {} sample {sample_id}: required offline feature keys {missing:?} (it carries {store_names:?})",
                        self.name
                    ),
                });
            }
            for name in store_names {
                let batch = self.offline_renames.iter().find(|(from, _)| from == name).map_or(*name, |(_, to)| *to);
                mapped.push((batch, name));
            }
        } else {
            mapped.extend(store_names.iter().map(|n| (*n, *n)));
        }
        let mut seen = HashSet::new();
        if let Some((batch, _)) = mapped.iter().find(|(batch, _)| !seen.insert(*batch)) {
            let sources: Vec<&str> = mapped.iter().filter(|(b, _)| b == batch).map(|(_, s)| *s).collect();
            return Err(Error::InvalidArgument(format!(
                "{} sample {sample_id}: features {sources:?} both become batch feature {batch:?}",
                self.name
            )));
        }
        let missing: Vec<&str> = self
            .features
            .iter()
            .filter(|r| r.required && !mapped.iter().any(|(b, _)| *b == r.name))
            .map(|r| r.name)
            .collect();
        if !missing.is_empty() {
            return Err(Error::NotFound {
                what: format!(
                    "{} sample {sample_id}: required feature(s) {missing:?} (it carries {store_names:?})",
                    self.name
                ),
            });
        }
        Ok(mapped)
    }
}

/// The strategies a loader may be built with.
#[derive(Debug, Clone)]
pub struct StrategyRegistry {
    entries: Vec<Strategy>,
}

impl Default for StrategyRegistry {
    fn default() -> Self {
        StrategyRegistry::builtin()
    }
}

impl StrategyRegistry {
    /// A registry holding [`BUILTIN`].
    pub fn builtin() -> Self {
        StrategyRegistry { entries: BUILTIN.to_vec() }
    }

    /// A registry with no entries.
    pub fn empty() -> Self {
        StrategyRegistry { entries: Vec::new() }
    }

    /// Adds a strategy; a name already registered or an incoherent entry is an error.
    pub fn register(&mut self, strategy: Strategy) -> Result<()> {
        strategy.check()?;
        if self.entries.iter().any(|s| s.name == strategy.name) {
            return Err(Error::InvalidArgument(format!("strategy {:?} is already registered", strategy.name)));
        }
        self.entries.push(strategy);
        Ok(())
    }

    /// The strategy of this name; an unknown name is an error listing the known ones.
    pub fn get(&self, name: &str) -> Result<&Strategy> {
        self.entries.iter().find(|s| s.name == name).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "unknown strategy {name:?}; registered strategies: {}",
                self.names().collect::<Vec<_>>().join(", ")
            ))
        })
    }

    /// The registered names, in order.
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.entries.iter().map(|s| s.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_entries_are_coherent() {
        for s in BUILTIN {
            s.check().unwrap();
        }
        assert_eq!(StrategyRegistry::builtin().names().collect::<Vec<_>>(), ["eagle3", "dflash", "domino"]);
    }

    #[test]
    fn eagle3_offline_samples_swap_hidden_roles() {
        let names = ["input_ids", "loss_mask", "aux_hidden_state", "hidden_state"];
        let mapped = EAGLE3.map_features("s0", &JsonMap::new(), &names).unwrap();
        assert_eq!(
            mapped,
            [
                ("input_ids", "input_ids"),
                ("loss_mask", "loss_mask"),
                ("hidden_state", "aux_hidden_state"),
                ("target", "hidden_state")
            ]
        );
    }

    #[test]
    fn eagle3_online_samples_keep_their_names() {
        let names = ["input_ids", "loss_mask", "attention_mask", "hidden_state", "target"];
        let mapped = EAGLE3.map_features("s0", &JsonMap::new(), &names).unwrap();
        assert!(mapped.iter().all(|(b, s)| b == s));
    }

    #[test]
    fn missing_features_are_named() {
        let err = EAGLE3.map_features("s0", &JsonMap::new(), &["input_ids", "aux_hidden_state", "hidden_state"]);
        let text = err.unwrap_err().to_string();
        assert!(text.contains("\"loss_mask\"") && text.contains("s0"), "{text}");
        let mut meta = JsonMap::new();
        meta.insert("format".into(), "offline_eagle3".into());
        let text = EAGLE3.map_features("s1", &meta, &["input_ids", "loss_mask", "hidden_state"]).unwrap_err();
        assert!(text.to_string().contains("\"aux_hidden_state\""), "{text}");
        let text = DFLASH.map_features("s2", &JsonMap::new(), &["input_ids", "loss_mask"]).unwrap_err();
        assert!(text.to_string().contains("\"hidden_states\""), "{text}");
    }

    #[test]
    fn incoherent_entries_and_duplicates_are_refused() {
        let mut registry = StrategyRegistry::builtin();
        assert!(registry.register(EAGLE3).unwrap_err().to_string().contains("already registered"));
        let bad = Strategy { name: "bad", offline_renames: &[("nope", "target")], ..EAGLE3 };
        assert!(registry.register(bad).unwrap_err().to_string().contains("not one of its offline raw keys"));
        const TWICE: &[FeatureRule] = &[FeatureRule::tokens("input_ids"), FeatureRule::fixed("input_ids")];
        let twice = Strategy { name: "twice", features: TWICE, ..DFLASH };
        assert!(twice.check().unwrap_err().to_string().contains("two rules"));
    }
}
