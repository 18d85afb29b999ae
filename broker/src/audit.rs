//! Keeping the audit log bounded against unauthenticated traffic.
//!
//! Anyone can send a malformed attestation, a forged nonce or a bogus certificate to the admin
//! API. Each such refusal is counted in the metrics, but only a bounded number become audit
//! rows of their own: a per-source and a global budget per minute, kept apart for two
//! classes, so that junk cannot crowd out the refusals worth reading ([`Class`]). What exceeds
//! a budget is counted and written once a minute as one `audit.suppressed` summary row (counts
//! by class, action and reason, and the busiest sources). Refusals after the nonce is spent,
//! admin calls whose certificate the operator CA issued, and every release and admin change
//! are always recorded one row each. Input echoed into a row is truncated.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use serde_json::json;

use crate::store::AuditRecord;

/// Longest text (in bytes) copied from a request into an error or an audit row.
pub const MAX_ECHO: usize = 200;
/// Most distinct sources tracked per window; past that, new sources share one budget.
const MAX_SOURCES: usize = 4096;
/// Sources listed in a summary row.
const TOP_SOURCES: usize = 10;

/// `s`, cut to at most [`MAX_ECHO`] bytes at a character boundary, with the length noted.
pub fn truncate(s: &str) -> String {
    if s.len() <= MAX_ECHO {
        return s.to_string();
    }
    let mut end = MAX_ECHO;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &s[..end], s.len())
}

/// Secret names asked for, as recorded for an unauthenticated refusal: at most 8, each cut to
/// [`MAX_ECHO`] bytes, with the count when there were more.
pub fn names(names: &[String]) -> serde_json::Value {
    let shown: Vec<String> = names.iter().take(8).map(|n| truncate(n)).collect();
    if names.len() > shown.len() {
        json!({ "names": shown, "count": names.len() })
    } else {
        json!(shown)
    }
}

/// Budgets for audit rows of unauthenticated refusals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SampleBudget {
    /// Rows per source per minute.
    pub per_source: u32,
    /// Rows per minute across all sources.
    pub global: u32,
}

impl Default for SampleBudget {
    fn default() -> Self {
        SampleBudget {
            per_source: 10,
            global: 120,
        }
    }
}

/// Which budget a refusal draws on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Nothing about the request was authenticated: malformed, a forged or expired nonce,
    /// evidence whose signature or chain did not verify, a certificate from another CA.
    Anonymous,
    /// Evidence that verified (AMD's chain and signature) and was refused before the spend,
    /// e.g. on the binding: a genuine platform, worth its own budget.
    Verified,
}

impl Class {
    fn name(self) -> &'static str {
        match self {
            Class::Anonymous => "anonymous",
            Class::Verified => "verified",
        }
    }
}

#[derive(Default)]
struct Window {
    global: u32,
    per_source: HashMap<String, u32>,
    suppressed: BTreeMap<String, u64>,
    suppressed_sources: HashMap<String, u64>,
}

/// Decides which unauthenticated refusals get a row of their own.
pub struct Sampler {
    budget: SampleBudget,
    window: Mutex<Window>,
    verified: Mutex<Window>,
}

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampler")
            .field("budget", &self.budget)
            .finish_non_exhaustive()
    }
}

impl Sampler {
    /// A sampler with `budget`.
    pub fn new(budget: SampleBudget) -> Sampler {
        Sampler {
            budget,
            window: Mutex::new(Window::default()),
            verified: Mutex::new(Window::default()),
        }
    }

    /// Whether a refusal of `kind` (e.g. `attest/malformed`) from `source` gets its own row
    /// in this window; if not, it is counted for the summary.
    pub fn admit(&self, class: Class, source: &str, kind: &str) -> bool {
        let window = match class {
            Class::Anonymous => &self.window,
            Class::Verified => &self.verified,
        };
        let Ok(mut w) = window.lock() else {
            return false;
        };
        let tracked = w.per_source.len() < MAX_SOURCES || w.per_source.contains_key(source);
        let key = if tracked { source } else { "(other sources)" };
        let used = w.per_source.get(key).copied().unwrap_or(0);
        if w.global < self.budget.global && used < self.budget.per_source {
            w.global += 1;
            *w.per_source.entry(key.to_string()).or_default() += 1;
            return true;
        }
        *w.suppressed
            .entry(format!("{}/{kind}", class.name()))
            .or_default() += 1;
        if w.suppressed_sources.len() < MAX_SOURCES || w.suppressed_sources.contains_key(key) {
            *w.suppressed_sources.entry(key.to_string()).or_default() += 1;
        }
        false
    }

    /// Ends the current window: the summary row of what was suppressed in it, if anything.
    pub fn roll(&self, at: i64, window_secs: u64) -> Option<AuditRecord> {
        let mut w = {
            let mut guard = self.window.lock().ok()?;
            std::mem::take(&mut *guard)
        };
        let v = {
            let mut guard = self.verified.lock().ok()?;
            std::mem::take(&mut *guard)
        };
        w.suppressed.extend(v.suppressed);
        for (source, n) in v.suppressed_sources {
            *w.suppressed_sources.entry(source).or_default() += n;
        }
        if w.suppressed.is_empty() {
            return None;
        }
        let total: u64 = w.suppressed.values().sum();
        let mut sources: Vec<(String, u64)> = w.suppressed_sources.into_iter().collect();
        sources.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        sources.truncate(TOP_SOURCES);
        Some(AuditRecord {
            id: 0,
            at,
            actor: "broker".into(),
            action: "audit.suppressed".into(),
            outcome: "ok".into(),
            detail: json!({
                "window_secs": window_secs,
                "suppressed": total,
                "by_kind": w.suppressed,
                "top_sources": sources
                    .into_iter()
                    .map(|(s, n)| json!({ "source": s, "count": n }))
                    .collect::<Vec<_>>(),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_char_boundaries_and_notes_the_length() {
        assert_eq!(truncate("short"), "short");
        let long = "é".repeat(1000);
        let t = truncate(&long);
        assert!(t.len() < MAX_ECHO + 30, "{}", t.len());
        assert!(t.ends_with("(2000 bytes)"), "{t}");
    }

    #[test]
    fn per_source_and_global_budgets_then_one_summary() {
        let s = Sampler::new(SampleBudget {
            per_source: 3,
            global: 5,
        });
        let anon = Class::Anonymous;
        let admitted: Vec<bool> = (0..5)
            .map(|_| s.admit(anon, "a", "attest/malformed"))
            .collect();
        assert_eq!(admitted, [true, true, true, false, false]);
        assert!(s.admit(anon, "b", "attest/nonce_malformed"));
        assert!(s.admit(anon, "c", "attest/malformed"));
        assert!(
            !s.admit(anon, "d", "attest/malformed"),
            "global budget spent"
        );
        // Junk does not crowd out verified evidence: its own budget.
        assert!(s.admit(Class::Verified, "d", "attest/binding"));
        let summary = s.roll(100, 60).unwrap();
        assert_eq!(summary.action, "audit.suppressed");
        assert_eq!(summary.detail["suppressed"], 3);
        assert_eq!(summary.detail["by_kind"]["anonymous/attest/malformed"], 3);
        assert_eq!(summary.detail["top_sources"][0]["source"], "a");
        assert_eq!(summary.detail["top_sources"][0]["count"], 2);
        // A new window: budgets restored, nothing to summarise.
        assert!(s.admit(anon, "a", "attest/malformed"));
        assert!(s.roll(160, 60).is_none());
    }
}
