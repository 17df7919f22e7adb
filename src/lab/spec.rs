//! What the lab runs a scenario under: a policy with optional knobs (`esx:tax=0`), and the
//! budget a run gets.
//!
//! A spec is `NAME[:KEY=VALUE[,KEY=VALUE]]`, the name one of the host's policies:
//!
//! | key | what it sets in the host's description |
//! |---|---|
//! | `tax` | `idle_tax_percent` (0 to 99) |
//! | `share` | `sharing_rate_idle` and `sharing_rate_busy` (pages per second per VM; 0: off) |
//! | `goal` | `goal_free_percent`: the free memory ESX's targets leave, percent of minFree |
//!
//! so that `--policy esx --policy esx:tax=0` compares ESX's policy with and without its idle
//! memory tax in one table. A knob a spec does not give is the scenario's, then the host's.

use crate::host::config::MAX_GOAL_FREE_PERCENT;
use crate::host::policy::POLICY_NAMES;

/// Largest sharing rate a spec may ask for, pages per second.
const MAX_SHARE_RATE: u64 = 10_000_000;

/// A policy and its knobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySpec {
    /// The policy's name (`--policy` of the host).
    pub policy: String,
    /// Idle memory tax, percent.
    pub tax_percent: Option<u8>,
    /// Both sharing scan rates, pages per second.
    pub share_rate: Option<u64>,
    /// ESX's goal of free memory, percent of minFree.
    pub goal_percent: Option<u64>,
    /// How the table names it: the spec as given.
    pub label: String,
}

/// A spec the lab cannot run.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    /// Not one of the host's policies.
    #[error("unknown policy {0:?}: use {1}")]
    Policy(String, String),
    /// A knob that does not exist or a value out of range.
    #[error(
        "policy {spec:?}: {msg} (knobs: tax=0..99, share=PAGES_PER_S, goal=PERCENT_OF_MINFREE)"
    )]
    Knob {
        /// The spec.
        spec: String,
        /// What is wrong.
        msg: String,
    },
}

impl PolicySpec {
    /// `name` with no knobs.
    pub fn plain(name: &str) -> Self {
        Self {
            policy: name.into(),
            tax_percent: None,
            share_rate: None,
            goal_percent: None,
            label: name.into(),
        }
    }

    /// Parses `NAME[:KEY=VALUE,...]`.
    ///
    /// # Errors
    /// An unknown policy or knob, or a value out of range.
    pub fn parse(spec: &str) -> Result<Self, SpecError> {
        let (name, knobs) = spec.split_once(':').unwrap_or((spec, ""));
        if !POLICY_NAMES.contains(&name) {
            return Err(SpecError::Policy(name.into(), POLICY_NAMES.join(", ")));
        }
        let mut out = Self { label: spec.into(), ..Self::plain(name) };
        let bad = |msg: String| SpecError::Knob { spec: spec.into(), msg };
        for knob in knobs.split(',').filter(|k| !k.is_empty()) {
            let (key, value) =
                knob.split_once('=').ok_or_else(|| bad(format!("{knob:?} is not KEY=VALUE")))?;
            let number: u64 =
                value.parse().map_err(|_| bad(format!("{key}: {value:?} is not a number")))?;
            match key {
                "tax" if number < 100 => out.tax_percent = u8::try_from(number).ok(),
                "tax" => return Err(bad(format!("tax: {number} is not below 100"))),
                "share" if number <= MAX_SHARE_RATE => out.share_rate = Some(number),
                "share" => return Err(bad(format!("share: {number} is over {MAX_SHARE_RATE}"))),
                "goal" if number <= MAX_GOAL_FREE_PERCENT => out.goal_percent = Some(number),
                "goal" => {
                    return Err(bad(format!("goal: {number} is over {MAX_GOAL_FREE_PERCENT}")))
                }
                _ => return Err(bad(format!("unknown knob {key:?}"))),
            }
        }
        Ok(out)
    }

    /// The lines this spec adds to the host's description.
    pub fn host_lines(&self) -> String {
        let mut out = String::new();
        if let Some(t) = self.tax_percent {
            out += &format!("idle_tax_percent = {t}\n");
        }
        if let Some(r) = self.share_rate {
            out += &format!("sharing_rate_idle = {r}\nsharing_rate_busy = {r}\n");
        }
        if let Some(g) = self.goal_percent {
            out += &format!("goal_free_percent = {g}\n");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_name_a_policy_and_its_knobs() {
        assert_eq!(PolicySpec::parse("esx").unwrap(), PolicySpec::plain("esx"));
        let s = PolicySpec::parse("esx:tax=0,share=0").unwrap();
        assert_eq!((s.policy.as_str(), s.tax_percent, s.share_rate), ("esx", Some(0), Some(0)));
        assert_eq!(s.label, "esx:tax=0,share=0");
        assert_eq!(
            s.host_lines(),
            "idle_tax_percent = 0\nsharing_rate_idle = 0\nsharing_rate_busy = 0\n"
        );
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        let e = |s: &str| PolicySpec::parse(s).unwrap_err().to_string();
        assert!(e("nope").starts_with("unknown policy \"nope\": use esx,"), "{}", e("nope"));
        assert!(e("esx:tax=100").contains("tax: 100 is not below 100"));
        assert!(e("esx:tax=-1").contains("tax: \"-1\" is not a number"));
        assert!(e("esx:speed=3").contains("unknown knob \"speed\""));
        assert!(e("esx:tax").contains("\"tax\" is not KEY=VALUE"));
        assert!(e("esx:share=99999999").contains("is over"));
        assert!(e("esx:goal=1001").contains("goal: 1001 is over 1000"));
        assert_eq!(
            PolicySpec::parse("esx:goal=64").unwrap().host_lines(),
            "goal_free_percent = 64\n"
        );
    }
}
