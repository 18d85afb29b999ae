//! The release policy: which verified guests may receive which secrets.
//!
//! A policy is JSON. It names rules, each a tree of `allOf` / `anyOf` over conditions
//! `{ "claim": NAME, OPERATOR: VALUE }` (the Azure Secure Key Release grammar), and maps each
//! secret to the rules that may receive it:
//!
//! ```json
//! {
//!   "rules": {
//!     "web": { "allOf": [
//!       { "claim": "measurement", "equals": "5a5a…" },
//!       { "claim": "policy.debug_allowed", "equals": false },
//!       { "claim": "tcb.reported.snp", "greaterOrEquals": 22 }
//!     ] }
//!   },
//!   "secrets": { "web-tls": ["web"] }
//! }
//! ```
//!
//! Loading is strict: unknown fields, unknown claims, ill-typed values, empty trees and
//! references to undefined rules are errors naming the JSON path. Evaluation is fail-closed:
//! a condition on a claim the evidence does not carry fails (except `exists: false`).

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::claims::Claims;

pub mod certificates;

pub use certificates::{CertificateProfile, RequestedName, Usage};

/// Largest policy document accepted.
pub const MAX_POLICY_BYTES: usize = 1024 * 1024;
/// Deepest `allOf`/`anyOf` nesting accepted.
pub const MAX_DEPTH: usize = 16;

/// The type of a claim's value, which decides the operators and values it accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClaimType {
    /// A byte string of this many bytes, written as hex.
    Hex(usize),
    /// An unsigned integer.
    Int,
    /// A boolean.
    Bool,
    /// One of a fixed set of strings.
    Enum(&'static [&'static str]),
    /// Free text.
    Text,
}

const PRODUCTS: &[&str] = &["Milan", "Genoa", "Turin"];
const KEYS: &[&str] = &["vcek", "vlek"];
const ROOTS: &[&str] = &["amd", "simulated"];

/// Every claim a policy may name, with its type. Names are dotted paths into [`Claims`]'
/// JSON form.
pub const CLAIMS: &[(&str, ClaimType)] = &[
    ("report_version", ClaimType::Int),
    ("product", ClaimType::Enum(PRODUCTS)),
    ("signing_key", ClaimType::Enum(KEYS)),
    ("root", ClaimType::Enum(ROOTS)),
    ("vek_fingerprint", ClaimType::Hex(32)),
    ("csp_id", ClaimType::Text),
    ("measurement", ClaimType::Hex(48)),
    ("host_data", ClaimType::Hex(32)),
    ("report_data", ClaimType::Hex(64)),
    ("chip_id", ClaimType::Hex(64)),
    ("family_id", ClaimType::Hex(16)),
    ("image_id", ClaimType::Hex(16)),
    ("id_key_digest", ClaimType::Hex(48)),
    ("author_key_digest", ClaimType::Hex(48)),
    ("author_key_enabled", ClaimType::Bool),
    ("report_id", ClaimType::Hex(32)),
    ("report_id_ma", ClaimType::Hex(32)),
    ("vmpl", ClaimType::Int),
    ("guest_svn", ClaimType::Int),
    ("policy.abi_major", ClaimType::Int),
    ("policy.abi_minor", ClaimType::Int),
    ("policy.smt_allowed", ClaimType::Bool),
    ("policy.migrate_ma_allowed", ClaimType::Bool),
    ("policy.debug_allowed", ClaimType::Bool),
    ("policy.single_socket", ClaimType::Bool),
    ("policy.cxl_allowed", ClaimType::Bool),
    ("policy.mem_aes_256_xts", ClaimType::Bool),
    ("policy.rapl_disabled", ClaimType::Bool),
    ("policy.ciphertext_hiding", ClaimType::Bool),
    ("policy.page_swap_disabled", ClaimType::Bool),
    ("policy.raw", ClaimType::Int),
    ("platform_info.smt_enabled", ClaimType::Bool),
    ("platform_info.tsme_enabled", ClaimType::Bool),
    ("platform_info.ecc_enabled", ClaimType::Bool),
    ("platform_info.rapl_disabled", ClaimType::Bool),
    ("platform_info.ciphertext_hiding_enabled", ClaimType::Bool),
    ("platform_info.alias_check_complete", ClaimType::Bool),
    ("platform_info.raw", ClaimType::Int),
    ("tcb.reported.fmc", ClaimType::Int),
    ("tcb.reported.bootloader", ClaimType::Int),
    ("tcb.reported.tee", ClaimType::Int),
    ("tcb.reported.snp", ClaimType::Int),
    ("tcb.reported.microcode", ClaimType::Int),
    ("tcb.committed.fmc", ClaimType::Int),
    ("tcb.committed.bootloader", ClaimType::Int),
    ("tcb.committed.tee", ClaimType::Int),
    ("tcb.committed.snp", ClaimType::Int),
    ("tcb.committed.microcode", ClaimType::Int),
    ("tcb.launch.fmc", ClaimType::Int),
    ("tcb.launch.bootloader", ClaimType::Int),
    ("tcb.launch.tee", ClaimType::Int),
    ("tcb.launch.snp", ClaimType::Int),
    ("tcb.launch.microcode", ClaimType::Int),
    ("tcb.current.fmc", ClaimType::Int),
    ("tcb.current.bootloader", ClaimType::Int),
    ("tcb.current.tee", ClaimType::Int),
    ("tcb.current.snp", ClaimType::Int),
    ("tcb.current.microcode", ClaimType::Int),
    ("current_firmware.major", ClaimType::Int),
    ("current_firmware.minor", ClaimType::Int),
    ("current_firmware.build", ClaimType::Int),
    ("committed_firmware.major", ClaimType::Int),
    ("committed_firmware.minor", ClaimType::Int),
    ("committed_firmware.build", ClaimType::Int),
    ("cpuid.family", ClaimType::Int),
    ("cpuid.model", ClaimType::Int),
    ("cpuid.stepping", ClaimType::Int),
    ("mitigation_vector.launch", ClaimType::Int),
    ("mitigation_vector.current", ClaimType::Int),
    ("azure.secure_boot", ClaimType::Bool),
    ("azure.tpm_enabled", ClaimType::Bool),
    ("azure.console_enabled", ClaimType::Bool),
    ("azure.tpm_persisted", ClaimType::Bool),
    ("azure.vm_id", ClaimType::Text),
    ("azure.user_data", ClaimType::Text),
    ("tpm.pcr.0", ClaimType::Hex(32)),
    ("tpm.pcr.1", ClaimType::Hex(32)),
    ("tpm.pcr.2", ClaimType::Hex(32)),
    ("tpm.pcr.3", ClaimType::Hex(32)),
    ("tpm.pcr.4", ClaimType::Hex(32)),
    ("tpm.pcr.5", ClaimType::Hex(32)),
    ("tpm.pcr.6", ClaimType::Hex(32)),
    ("tpm.pcr.7", ClaimType::Hex(32)),
    ("tpm.pcr.8", ClaimType::Hex(32)),
    ("tpm.pcr.9", ClaimType::Hex(32)),
    ("tpm.pcr.10", ClaimType::Hex(32)),
    ("tpm.pcr.11", ClaimType::Hex(32)),
    ("tpm.pcr.12", ClaimType::Hex(32)),
    ("tpm.pcr.13", ClaimType::Hex(32)),
    ("tpm.pcr.14", ClaimType::Hex(32)),
    ("tpm.pcr.15", ClaimType::Hex(32)),
    ("tpm.pcr.16", ClaimType::Hex(32)),
    ("tpm.pcr.17", ClaimType::Hex(32)),
    ("tpm.pcr.18", ClaimType::Hex(32)),
    ("tpm.pcr.19", ClaimType::Hex(32)),
    ("tpm.pcr.20", ClaimType::Hex(32)),
    ("tpm.pcr.21", ClaimType::Hex(32)),
    ("tpm.pcr.22", ClaimType::Hex(32)),
    ("tpm.pcr.23", ClaimType::Hex(32)),
    ("tpm.ak_fingerprint", ClaimType::Hex(32)),
];

fn claim_type(name: &str) -> Option<ClaimType> {
    CLAIMS.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}

/// A policy that failed to load: where, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("policy {path}: {message}")]
pub struct PolicyError {
    /// JSON pointer to the offending value (e.g. `/rules/web/allOf/1/equals`).
    pub path: String,
    /// What is wrong.
    pub message: String,
}

fn err(path: &str, message: impl Into<String>) -> PolicyError {
    PolicyError {
        path: if path.is_empty() {
            "/".into()
        } else {
            path.into()
        },
        message: message.into(),
    }
}

/// A typed comparison value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Operand {
    /// Boolean.
    Bool(bool),
    /// Unsigned integer.
    Int(u64),
    /// String (hex claims are stored lower-case).
    Text(String),
}

impl fmt::Display for Operand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Operand::Bool(b) => write!(f, "{b}"),
            Operand::Int(i) => write!(f, "{i}"),
            Operand::Text(s) => write!(f, "\"{s}\""),
        }
    }
}

/// A condition operator with its operand(s).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Operator {
    /// The claim equals the value.
    Equals(Operand),
    /// The claim is present and differs from the value.
    NotEquals(Operand),
    /// The claim equals one of the values.
    In(Vec<Operand>),
    /// The claim is present and equals none of the values (a deny-list).
    NotIn(Vec<Operand>),
    /// The (integer) claim is at least the value.
    GreaterOrEquals(u64),
    /// The (integer) claim is at most the value.
    LessOrEquals(u64),
    /// The claim is present (`true`) or absent (`false`).
    Exists(bool),
}

impl Operator {
    fn keyword(&self) -> &'static str {
        match self {
            Operator::Equals(_) => "equals",
            Operator::NotEquals(_) => "notEquals",
            Operator::In(_) => "in",
            Operator::NotIn(_) => "notIn",
            Operator::GreaterOrEquals(_) => "greaterOrEquals",
            Operator::LessOrEquals(_) => "lessOrEquals",
            Operator::Exists(_) => "exists",
        }
    }
}

/// A node of a rule's condition tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Condition {
    /// Every child holds.
    AllOf(Vec<Condition>),
    /// At least one child holds.
    AnyOf(Vec<Condition>),
    /// A comparison on one claim.
    Claim {
        /// Claim name.
        claim: &'static str,
        /// The comparison.
        operator: Operator,
    },
}

/// A loaded, checked policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    rules: BTreeMap<String, Condition>,
    secrets: BTreeMap<String, Vec<String>>,
    certificates: BTreeMap<String, CertificateProfile>,
    source: Value,
}

const OPERATORS: [&str; 7] = [
    "equals",
    "notEquals",
    "in",
    "notIn",
    "greaterOrEquals",
    "lessOrEquals",
    "exists",
];

/// Names of rules and secrets: letters, digits, `.`, `_`, `-`; 1 to 128 characters; not `.`
/// or `..`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        // Path segments with a meaning of their own in URLs.
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A policy document's JSON, within the size limit.
fn parse_document(text: &str) -> Result<Value, PolicyError> {
    if text.len() > MAX_POLICY_BYTES {
        return Err(err("", "policy is larger than 1 MiB"));
    }
    serde_json::from_str(text).map_err(|e| err("", format!("not valid JSON: {e}")))
}

/// Refuses a document in which an object names a key twice (JSON parsers disagree on which
/// one wins; serde_json keeps the last): the error points at the second occurrence.
fn reject_duplicate_keys(text: &str) -> Result<(), PolicyError> {
    use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
    use std::cell::RefCell;

    struct Seed<'a> {
        path: String,
        found: &'a RefCell<Option<String>>,
    }

    impl<'de> DeserializeSeed<'de> for Seed<'_> {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Seed<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("JSON")
        }
        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_u64<E>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E>(self, _: f64) -> Result<(), E> {
            Ok(())
        }
        fn visit_str<E>(self, _: &str) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            Ok(())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            let mut i = 0usize;
            while seq
                .next_element_seed(Seed {
                    path: format!("{}/{i}", self.path),
                    found: self.found,
                })?
                .is_some()
            {
                i += 1;
            }
            Ok(())
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let mut seen = std::collections::HashSet::new();
            while let Some(key) = map.next_key::<String>()? {
                let path = format!("{}/{}", self.path, escape(&key));
                if !seen.insert(key) {
                    *self.found.borrow_mut() = Some(path);
                    return Err(serde::de::Error::custom("duplicate key"));
                }
                map.next_value_seed(Seed {
                    path,
                    found: self.found,
                })?;
            }
            Ok(())
        }
    }

    let found = RefCell::new(None);
    let mut de = serde_json::Deserializer::from_str(text);
    let result = Seed {
        path: String::new(),
        found: &found,
    }
    .deserialize(&mut de);
    match (result, found.into_inner()) {
        (Err(_), Some(path)) => Err(err(
            &path,
            "this key appears twice in its object; JSON parsers disagree on which one counts",
        )),
        (Err(e), None) => Err(err("", format!("not valid JSON: {e}"))),
        (Ok(()), _) => Ok(()),
    }
}

fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

impl Policy {
    /// Parses and checks a policy document.
    pub fn from_json(text: &str) -> Result<Policy, PolicyError> {
        let value = parse_document(text)?;
        reject_duplicate_keys(text)?;
        Policy::from_value(value)
    }

    /// Loads a document stored by an earlier version, as [`Policy::from_json`] does but
    /// without refusing repeated keys (the last one counts, as it did when it was stored):
    /// a policy that was accepted keeps deciding after an upgrade. New documents go through
    /// [`Policy::from_json`].
    pub fn from_stored_json(text: &str) -> Result<Policy, PolicyError> {
        Policy::from_value(parse_document(text)?)
    }

    /// Checks a parsed policy document.
    pub fn from_value(value: Value) -> Result<Policy, PolicyError> {
        let top = value
            .as_object()
            .ok_or_else(|| err("", "a policy is a JSON object"))?;
        for key in top.keys() {
            if !matches!(
                key.as_str(),
                "rules" | "secrets" | "certificates" | "description" | "$schema"
            ) {
                return Err(err(
                    &format!("/{}", escape(key)),
                    format!(
                        "unknown field {key:?} (expected rules, secrets, certificates, description)"
                    ),
                ));
            }
        }
        if let Some(d) = top.get("description")
            && !d.is_string()
        {
            return Err(err("/description", "must be a string"));
        }
        let rules_v = top
            .get("rules")
            .and_then(Value::as_object)
            .ok_or_else(|| err("/rules", "required: an object of named rules"))?;
        let mut rules = BTreeMap::new();
        for (name, body) in rules_v {
            let path = format!("/rules/{}", escape(name));
            if !valid_name(name) {
                return Err(err(&path, "rule names use letters, digits, '.', '_', '-'"));
            }
            rules.insert(name.clone(), parse_condition(body, &path, 0)?);
        }
        let secrets_v = top
            .get("secrets")
            .and_then(Value::as_object)
            .ok_or_else(|| err("/secrets", "required: an object mapping secrets to rules"))?;
        let mut secrets = BTreeMap::new();
        for (name, refs) in secrets_v {
            let path = format!("/secrets/{}", escape(name));
            if !valid_name(name) {
                return Err(err(
                    &path,
                    "secret names use letters, digits, '.', '_', '-'",
                ));
            }
            let list = refs
                .as_array()
                .ok_or_else(|| err(&path, "must be an array of rule names"))?;
            let mut names = Vec::new();
            for (i, r) in list.iter().enumerate() {
                let p = format!("{path}/{i}");
                let r = r.as_str().ok_or_else(|| err(&p, "must be a rule name"))?;
                if !rules.contains_key(r) {
                    return Err(err(&p, format!("no rule named {r:?}")));
                }
                names.push(r.to_string());
            }
            secrets.insert(name.clone(), names);
        }
        let mut certificates = BTreeMap::new();
        if let Some(v) = top.get("certificates") {
            let profiles = v.as_object().ok_or_else(|| {
                err(
                    "/certificates",
                    "an object mapping certificate profiles to their grants",
                )
            })?;
            for (name, body) in profiles {
                let profile = certificates::parse_profile(name, body, |r| rules.contains_key(r))?;
                certificates.insert(name.clone(), profile);
            }
        }
        Ok(Policy {
            rules,
            secrets,
            certificates,
            source: value,
        })
    }

    /// The document as loaded.
    pub fn to_json(&self) -> &Value {
        &self.source
    }

    /// Rule names, in order.
    pub fn rules(&self) -> impl Iterator<Item = &str> {
        self.rules.keys().map(String::as_str)
    }

    /// Secrets this policy can release, in order.
    pub fn secrets(&self) -> impl Iterator<Item = &str> {
        self.secrets.keys().map(String::as_str)
    }

    /// Decides whether `secret` may be released to a guest with these claims: it may when at
    /// least one of the rules listed for it holds. The result explains every condition.
    pub fn decide(&self, secret: &str, claims: &Claims) -> Decision {
        self.decide_json(secret, &claims.to_json())
    }

    /// [`Self::decide`] on the JSON form of verified claims ([`Claims::to_json`]), for a
    /// caller that carried them in its own authenticated session (the KBS front end, between
    /// its attestation and resource requests).
    pub fn decide_json(&self, secret: &str, json: &Value) -> Decision {
        let Some(rule_names) = self.secrets.get(secret) else {
            return Decision {
                secret: secret.to_string(),
                released: false,
                rule: None,
                rules: Vec::new(),
                reason: format!("the policy names no rule for secret {secret:?}"),
            };
        };
        self.decide_rules(secret, rule_names, json)
    }

    /// Certificate profiles, in order.
    pub fn certificate_profiles(&self) -> impl Iterator<Item = (&str, &CertificateProfile)> {
        self.certificates.iter().map(|(n, p)| (n.as_str(), p))
    }

    /// A certificate profile.
    pub fn certificate_profile(&self, name: &str) -> Option<&CertificateProfile> {
        self.certificates.get(name)
    }

    /// Decides whether a guest with these claims (their JSON form) may be certified under
    /// `profile`: it may when one of the profile's rules holds. The names it asks for are
    /// checked with [`CertificateProfile::permits`]. The decision's `secret` is
    /// `certificate:<profile>`.
    pub fn decide_certificate(&self, profile: &str, json: &Value) -> Decision {
        let what = format!("certificate:{profile}");
        let Some(p) = self.certificates.get(profile) else {
            return Decision {
                secret: what,
                released: false,
                rule: None,
                rules: Vec::new(),
                reason: format!("the policy has no certificate profile {profile:?}"),
            };
        };
        self.decide_rules(&what, &p.rules, json)
    }

    fn decide_rules(&self, secret: &str, rule_names: &[String], json: &Value) -> Decision {
        let mut outcomes = Vec::new();
        let mut granted = None;
        for name in rule_names {
            let Some(cond) = self.rules.get(name) else {
                continue;
            };
            let outcome = evaluate(cond, json);
            if outcome.passed && granted.is_none() {
                granted = Some(name.clone());
            }
            outcomes.push(RuleOutcome {
                rule: name.clone(),
                passed: outcome.passed,
                conditions: outcome,
            });
        }
        let reason = match &granted {
            Some(rule) => format!("rule {rule:?} holds"),
            None if outcomes.is_empty() => format!("no rule is listed for {secret}"),
            None => outcomes
                .iter()
                .map(|o| format!("rule {:?}: {}", o.rule, first_failure(&o.conditions)))
                .collect::<Vec<_>>()
                .join("; "),
        };
        Decision {
            secret: secret.to_string(),
            released: granted.is_some(),
            rule: granted,
            rules: outcomes,
            reason,
        }
    }
}

impl Policy {
    /// The rules (in order) whose conditions hold for these claims (their JSON form): what an
    /// attestation result reports as the appraisal.
    pub fn holding_rules(&self, json: &Value) -> Vec<String> {
        self.rules
            .iter()
            .filter(|(_, cond)| evaluate(cond, json).passed)
            .map(|(name, _)| name.clone())
            .collect()
    }
}

fn first_failure(o: &Outcome) -> String {
    if o.passed {
        return "holds".into();
    }
    match o.children.iter().find(|c| !c.passed) {
        Some(child) if o.kind == "allOf" => first_failure(child),
        _ => o.description.clone(),
    }
}

fn parse_condition(v: &Value, path: &str, depth: usize) -> Result<Condition, PolicyError> {
    if depth > MAX_DEPTH {
        return Err(err(path, format!("nested deeper than {MAX_DEPTH}")));
    }
    let obj = v
        .as_object()
        .ok_or_else(|| err(path, "a condition is an object"))?;
    let has = |k: &str| obj.contains_key(k);
    let tree_keys = ["allOf", "anyOf"].iter().filter(|k| has(k)).count();
    if tree_keys > 0 {
        if obj.len() != 1 {
            return Err(err(
                path,
                "an allOf/anyOf node has exactly one key (allOf or anyOf)",
            ));
        }
        let (key, children) = obj
            .iter()
            .next()
            .ok_or_else(|| err(path, "empty condition"))?;
        let list = children
            .as_array()
            .ok_or_else(|| err(&format!("{path}/{key}"), "must be an array of conditions"))?;
        if list.is_empty() {
            return Err(err(&format!("{path}/{key}"), "must not be empty"));
        }
        let mut parsed = Vec::new();
        for (i, c) in list.iter().enumerate() {
            parsed.push(parse_condition(c, &format!("{path}/{key}/{i}"), depth + 1)?);
        }
        return Ok(if key == "allOf" {
            Condition::AllOf(parsed)
        } else {
            Condition::AnyOf(parsed)
        });
    }
    parse_leaf(obj, path)
}

fn parse_leaf(obj: &Map<String, Value>, path: &str) -> Result<Condition, PolicyError> {
    let claim_v = obj
        .get("claim")
        .ok_or_else(|| err(path, "a condition needs \"claim\" (or is an allOf/anyOf)"))?;
    let name = claim_v
        .as_str()
        .ok_or_else(|| err(&format!("{path}/claim"), "must be a string"))?;
    let (claim, ty) = CLAIMS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(n, t)| (*n, *t))
        .ok_or_else(|| err(&format!("{path}/claim"), format!("unknown claim {name:?}")))?;
    let mut op = None;
    for key in obj.keys() {
        if key == "claim" {
            continue;
        }
        if !OPERATORS.contains(&key.as_str()) {
            return Err(err(
                &format!("{path}/{}", escape(key)),
                format!(
                    "unknown field {key:?} (operators: {})",
                    OPERATORS.join(", ")
                ),
            ));
        }
        if op.is_some() {
            return Err(err(path, "a condition has exactly one operator"));
        }
        op = Some(key.as_str());
    }
    let key = op.ok_or_else(|| err(path, "a condition needs an operator"))?;
    let vpath = format!("{path}/{key}");
    let value = obj.get(key).unwrap_or(&Value::Null);
    let operator = match key {
        "equals" => Operator::Equals(operand(value, ty, &vpath)?),
        "notEquals" => Operator::NotEquals(operand(value, ty, &vpath)?),
        "in" | "notIn" => {
            let list = value
                .as_array()
                .ok_or_else(|| err(&vpath, "must be an array"))?;
            if list.is_empty() {
                return Err(err(&vpath, "must not be empty"));
            }
            let mut out = Vec::new();
            for (i, v) in list.iter().enumerate() {
                out.push(operand(v, ty, &format!("{vpath}/{i}"))?);
            }
            if key == "in" {
                Operator::In(out)
            } else {
                Operator::NotIn(out)
            }
        }
        "greaterOrEquals" | "lessOrEquals" => {
            if ty != ClaimType::Int {
                return Err(err(&vpath, format!("{key} applies to integer claims only")));
            }
            let n = value
                .as_u64()
                .ok_or_else(|| err(&vpath, "must be a non-negative integer"))?;
            if key == "greaterOrEquals" {
                Operator::GreaterOrEquals(n)
            } else {
                Operator::LessOrEquals(n)
            }
        }
        _ => Operator::Exists(
            value
                .as_bool()
                .ok_or_else(|| err(&vpath, "must be true or false"))?,
        ),
    };
    Ok(Condition::Claim { claim, operator })
}

/// Operands as `a, b, c`, for explanations.
fn list(xs: &[Operand]) -> String {
    xs.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn operand(v: &Value, ty: ClaimType, path: &str) -> Result<Operand, PolicyError> {
    match ty {
        ClaimType::Bool => v
            .as_bool()
            .map(Operand::Bool)
            .ok_or_else(|| err(path, "must be true or false")),
        ClaimType::Int => v
            .as_u64()
            .map(Operand::Int)
            .ok_or_else(|| err(path, "must be a non-negative integer")),
        ClaimType::Hex(n) => {
            let s = v
                .as_str()
                .ok_or_else(|| err(path, format!("must be a hex string of {n} bytes")))?;
            let lower = s.to_ascii_lowercase();
            match hex::decode(&lower) {
                Ok(bytes) if bytes.len() == n => Ok(Operand::Text(lower)),
                _ => Err(err(
                    path,
                    format!("must be {} hex digits ({n} bytes), got {:?}", 2 * n, s),
                )),
            }
        }
        ClaimType::Enum(options) => {
            let s = v.as_str().unwrap_or_default();
            if options.contains(&s) {
                Ok(Operand::Text(s.to_string()))
            } else {
                Err(err(path, format!("must be one of {}", options.join(", "))))
            }
        }
        ClaimType::Text => v
            .as_str()
            .map(|s| Operand::Text(s.to_string()))
            .ok_or_else(|| err(path, "must be a string")),
    }
}

/// The outcome of one condition node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Outcome {
    /// `allOf`, `anyOf` or the operator keyword.
    pub kind: &'static str,
    /// Human-readable: `tcb.reported.snp >= 22 (actual 23)`.
    pub description: String,
    /// Whether it holds.
    pub passed: bool,
    /// Children of an `allOf`/`anyOf`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<Outcome>,
}

/// The outcome of one rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RuleOutcome {
    /// Rule name.
    pub rule: String,
    /// Whether it holds.
    pub passed: bool,
    /// The condition tree's outcome.
    pub conditions: Outcome,
}

/// A release decision with its explanation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// The secret asked for.
    pub secret: String,
    /// Whether it may be released.
    pub released: bool,
    /// The rule that allowed it.
    pub rule: Option<String>,
    /// Every rule evaluated for it.
    pub rules: Vec<RuleOutcome>,
    /// One line: which rule allowed it, or the first failed condition of each rule.
    pub reason: String,
}

fn lookup<'a>(claims: &'a Value, name: &str) -> Option<&'a Value> {
    let mut v = claims;
    for part in name.split('.') {
        v = v.get(part)?;
    }
    (!v.is_null()).then_some(v)
}

fn actual(v: &Value) -> Option<Operand> {
    match v {
        Value::Bool(b) => Some(Operand::Bool(*b)),
        Value::Number(n) => n.as_u64().map(Operand::Int),
        Value::String(s) => Some(Operand::Text(s.to_ascii_lowercase_if_hex())),
        _ => None,
    }
}

trait HexNorm {
    fn to_ascii_lowercase_if_hex(&self) -> String;
}
impl HexNorm for String {
    fn to_ascii_lowercase_if_hex(&self) -> String {
        if self.bytes().all(|b| b.is_ascii_hexdigit()) {
            self.to_ascii_lowercase()
        } else {
            self.clone()
        }
    }
}

fn evaluate(cond: &Condition, claims: &Value) -> Outcome {
    match cond {
        Condition::AllOf(children) | Condition::AnyOf(children) => {
            let all = matches!(cond, Condition::AllOf(_));
            let outcomes: Vec<Outcome> = children.iter().map(|c| evaluate(c, claims)).collect();
            let passed = if all {
                outcomes.iter().all(|o| o.passed)
            } else {
                outcomes.iter().any(|o| o.passed)
            };
            Outcome {
                kind: if all { "allOf" } else { "anyOf" },
                description: format!(
                    "{} of {} conditions",
                    if all { "all" } else { "any" },
                    outcomes.len()
                ),
                passed,
                children: outcomes,
            }
        }
        Condition::Claim { claim, operator } => {
            let value = lookup(claims, claim).and_then(actual);
            let (passed, expect) = match (operator, &value) {
                (Operator::Exists(want), v) => (v.is_some() == *want, format!("exists {want}")),
                (Operator::Equals(x), Some(v)) => (v == x, format!("== {x}")),
                (Operator::NotEquals(x), Some(v)) => (v != x, format!("!= {x}")),
                (Operator::In(xs), Some(v)) => (xs.contains(v), format!("in [{}]", list(xs))),
                (Operator::NotIn(xs), Some(v)) => {
                    (!xs.contains(v), format!("not in [{}]", list(xs)))
                }
                (Operator::GreaterOrEquals(n), Some(Operand::Int(v))) => {
                    (v >= n, format!(">= {n}"))
                }
                (Operator::LessOrEquals(n), Some(Operand::Int(v))) => (v <= n, format!("<= {n}")),
                (op, _) => (false, format!("{} (claim absent)", op.keyword())),
            };
            let actual = match &value {
                Some(v) => format!(" (actual {v})"),
                None => String::new(),
            };
            Outcome {
                kind: operator.keyword(),
                description: format!("{claim} {expect}{actual}"),
                passed,
                children: Vec::new(),
            }
        }
    }
}

/// Drafts a strict policy from verified claims: this measurement, debugging and migration
/// agent off, this VMPL, this product, an AMD root, and a TCB floor at the reported TCB.
/// The rule is named `rule_name`; each of `secrets` is mapped to it.
pub fn suggest(claims: &Claims, rule_name: &str, secrets: &[String]) -> Value {
    let mut doc = draft(
        &claims.measurement,
        claims.vmpl,
        Some(claims.product),
        &claims.tcb.reported,
        rule_name,
        secrets,
        "",
    );
    // Azure: the measurement is the paravisor's; the guest's own boot is in the vTPM PCRs.
    let mut extra = Vec::new();
    let mut warning = "";
    if let Some(azure) = &claims.azure {
        // Measurement and PCRs are the same for every VM booted from the same image on the
        // same paravisor, in anyone's subscription: pin which VMs are yours.
        if let Some(id) = &azure.vm_id {
            extra.push(serde_json::json!({ "claim": "azure.vm_id", "in": [id] }));
            warning = " Azure: measurement and PCRs are shared by every VM booted from this image; \
                       azure.vm_id pins this VM (list each of yours, or distinguish your image).";
        }
        if let Some(sb) = azure.secure_boot {
            extra.push(serde_json::json!({ "claim": "azure.secure_boot", "equals": sb }));
        }
        if let Some(console) = azure.console_enabled {
            extra.push(serde_json::json!({ "claim": "azure.console_enabled", "equals": console }));
        }
    }
    if let Some(tpm) = &claims.tpm {
        // PCR 4: boot manager code; PCR 7: Secure Boot policy (the keys that signed the boot
        // chain). Kernel and command line (PCRs 8, 9, 11) change with every update: add them
        // deliberately.
        for pcr in ["4", "7"] {
            if let Some(v) = tpm.pcr.get(pcr) {
                extra.push(serde_json::json!({ "claim": format!("tpm.pcr.{pcr}"), "equals": v }));
            }
        }
    }
    if let Some(conditions) = doc
        .pointer_mut(&format!("/rules/{rule_name}/allOf"))
        .and_then(Value::as_array_mut)
    {
        conditions.extend(extra);
    }
    if let Some(Value::String(description)) = doc.get_mut("description") {
        description.push_str(warning);
    }
    doc
}

/// Drafts the same policy from a report that could not be verified (no VCEK at hand). The
/// draft says so in its description; the broker still verifies everything at release. A
/// version 2 report does not name its product, so the draft then has no product condition.
pub fn suggest_unverified(
    report: &crate::AttestationReport,
    rule_name: &str,
    secrets: &[String],
) -> Value {
    let product = report.cpuid_product();
    // Version 2 reports come from Milan or Genoa, which share a TCB layout.
    let tcb = report.reported_tcb(product.unwrap_or(crate::Product::Milan));
    draft(
        &hex::encode(report.measurement()),
        report.vmpl(),
        product,
        &tcb,
        rule_name,
        secrets,
        " UNVERIFIED: drafted without the VCEK, so nothing vouches for these values.",
    )
}

/// Drafts a policy from a launch measurement computed from the guest's image (`broker
/// measure`) rather than read from a guest: the same conditions as [`suggest`] (debug and
/// migration agents off, the VMPL, the product, AMD's root), with the TCB minimums given,
/// since no report says what the platform runs.
pub fn suggest_from_measurement(
    measurement: &[u8; 48],
    product: crate::Product,
    min_tcb: &crate::report::Tcb,
    vmpl: u32,
    rule_name: &str,
    secrets: &[String],
) -> Value {
    draft(
        &hex::encode(measurement),
        vmpl,
        Some(product),
        min_tcb,
        rule_name,
        secrets,
        " The measurement was computed from the image (broker measure), not read from a guest; \
         the TCB minimums are the ones given.",
    )
}

fn draft(
    measurement: &str,
    vmpl: u32,
    product: Option<crate::Product>,
    tcb: &crate::report::Tcb,
    rule_name: &str,
    secrets: &[String],
    warning: &str,
) -> Value {
    use serde_json::json;
    let mut conditions = vec![
        json!({ "claim": "measurement", "equals": measurement }),
        json!({ "claim": "policy.debug_allowed", "equals": false }),
        json!({ "claim": "policy.migrate_ma_allowed", "equals": false }),
        json!({ "claim": "vmpl", "equals": vmpl }),
    ];
    if let Some(p) = product {
        conditions.push(json!({ "claim": "product", "equals": p.name() }));
    }
    conditions.push(json!({ "claim": "root", "equals": "amd" }));
    if let Some(fmc) = tcb.fmc {
        conditions.push(json!({ "claim": "tcb.reported.fmc", "greaterOrEquals": fmc }));
    }
    conditions.extend([
        json!({ "claim": "tcb.reported.bootloader", "greaterOrEquals": tcb.bootloader }),
        json!({ "claim": "tcb.reported.tee", "greaterOrEquals": tcb.tee }),
        json!({ "claim": "tcb.reported.snp", "greaterOrEquals": tcb.snp }),
        json!({ "claim": "tcb.reported.microcode", "greaterOrEquals": tcb.microcode }),
    ]);
    let secrets: Map<String, Value> = secrets
        .iter()
        .map(|s| (s.clone(), json!([rule_name])))
        .collect();
    let product_name = product.map_or("SEV-SNP", crate::Product::name);
    json!({
        "description": format!(
            "Drafted from a {product_name} report (measurement {}…). Review before use.{warning}",
            measurement.get(..16).unwrap_or("")
        ),
        "rules": { rule_name: { "allOf": conditions } },
        "secrets": secrets,
    })
}

/// The JSON Schema (2020-12) of policy documents, generated from the claim table.
pub fn json_schema() -> Value {
    use serde_json::json;
    let mut leaves = Vec::new();
    type Pick = fn(ClaimType) -> bool;
    let groups: [Pick; 5] = [
        |t| t == ClaimType::Bool,
        |t| t == ClaimType::Int,
        |t| t == ClaimType::Text,
        |t| matches!(t, ClaimType::Hex(_)),
        |t| matches!(t, ClaimType::Enum(_)),
    ];
    for pick in groups {
        // Claims of one value schema share a leaf schema.
        let mut by_schema: BTreeMap<String, (Value, Vec<&str>)> = BTreeMap::new();
        for (name, ty) in CLAIMS {
            if !pick(*ty) {
                continue;
            }
            let value = match ty {
                ClaimType::Bool => json!({ "type": "boolean" }),
                ClaimType::Int => json!({ "type": "integer", "minimum": 0 }),
                ClaimType::Text => json!({ "type": "string" }),
                ClaimType::Hex(n) => {
                    json!({ "type": "string", "pattern": format!("^[0-9a-fA-F]{{{}}}$", 2 * n) })
                }
                ClaimType::Enum(options) => json!({ "enum": options }),
            };
            by_schema
                .entry(value.to_string())
                .or_insert_with(|| (value, Vec::new()))
                .1
                .push(name);
        }
        for (_, (value, names)) in by_schema {
            let mut ops = serde_json::Map::new();
            ops.insert("equals".into(), value.clone());
            ops.insert("notEquals".into(), value.clone());
            ops.insert(
                "in".into(),
                json!({ "type": "array", "items": value, "minItems": 1 }),
            );
            ops.insert(
                "notIn".into(),
                json!({ "type": "array", "items": value, "minItems": 1 }),
            );
            ops.insert("exists".into(), json!({ "type": "boolean" }));
            if value.get("type") == Some(&json!("integer")) {
                ops.insert(
                    "greaterOrEquals".into(),
                    json!({ "type": "integer", "minimum": 0 }),
                );
                ops.insert(
                    "lessOrEquals".into(),
                    json!({ "type": "integer", "minimum": 0 }),
                );
            }
            let one_of: Vec<Value> = ops.keys().map(|k| json!({ "required": [k] })).collect();
            let mut props = ops.clone();
            props.insert("claim".into(), json!({ "enum": names }));
            leaves.push(json!({
                "type": "object",
                "properties": props,
                "required": ["claim"],
                "additionalProperties": false,
                "oneOf": one_of,
            }));
        }
    }
    let name = json!({ "type": "string", "pattern": "^[A-Za-z0-9._-]{1,128}$" });
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://snp-key-broker.invalid/schema/policy-v1.json",
        "title": "snp-key-broker release policy",
        "type": "object",
        "required": ["rules", "secrets"],
        "additionalProperties": false,
        "properties": {
            "$schema": { "type": "string" },
            "description": { "type": "string" },
            "rules": {
                "type": "object",
                "propertyNames": name,
                "additionalProperties": { "$ref": "#/$defs/condition" }
            },
            "secrets": {
                "type": "object",
                "propertyNames": name,
                "additionalProperties": { "type": "array", "items": name }
            },
            "certificates": {
                "type": "object",
                "propertyNames": name,
                "additionalProperties": { "$ref": "#/$defs/certificateProfile" }
            }
        },
        "$defs": {
            "certificateProfile": {
                "type": "object",
                "required": ["rules", "usages"],
                "additionalProperties": false,
                "anyOf": [
                    { "required": ["dns"], "properties": { "dns": { "minItems": 1 } } },
                    { "required": ["ip"], "properties": { "ip": { "minItems": 1 } } },
                    { "required": ["uri"], "properties": { "uri": { "minItems": 1 } } }
                ],
                "properties": {
                    "description": { "type": "string" },
                    "rules": { "type": "array", "items": name },
                    "dns": {
                        "type": "array", "maxItems": 256,
                        "items": { "type": "string", "pattern": "^(\\*\\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)+$", "maxLength": 255 }
                    },
                    "ip": { "type": "array", "maxItems": 256, "items": { "type": "string" } },
                    "uri": {
                        "type": "array", "maxItems": 256,
                        "items": { "type": "string", "pattern": "^[A-Za-z][A-Za-z0-9+.-]*:[!-~]+$", "maxLength": 512 }
                    },
                    "usages": {
                        "type": "array", "minItems": 1,
                        "items": { "enum": ["serverAuth", "clientAuth"] }
                    },
                    "max_lifetime_hours": { "type": "integer", "minimum": 1, "maximum": certificates::MAX_LIFETIME_HOURS }
                }
            },
            "condition": {
                "oneOf": [
                    {
                        "type": "object",
                        "properties": { "allOf": { "type": "array", "minItems": 1, "items": { "$ref": "#/$defs/condition" } } },
                        "required": ["allOf"],
                        "additionalProperties": false
                    },
                    {
                        "type": "object",
                        "properties": { "anyOf": { "type": "array", "minItems": 1, "items": { "$ref": "#/$defs/condition" } } },
                        "required": ["anyOf"],
                        "additionalProperties": false
                    },
                    { "$ref": "#/$defs/claimCondition" }
                ]
            },
            "claimCondition": { "oneOf": leaves }
        }
    })
}

/// Whether a claim name is known to the policy language.
pub fn is_known_claim(name: &str) -> bool {
    claim_type(name).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Endorsements, TrustAnchors, Verifier};
    use serde_json::json;
    use std::time::{Duration, UNIX_EPOCH};

    fn claims(dir: &str) -> Claims {
        let base = format!("{}/tests/data/{dir}", env!("CARGO_MANIFEST_DIR"));
        let report = std::fs::read(format!("{base}/report.bin")).unwrap();
        let vek = std::fs::read(format!("{base}/vek.der")).unwrap();
        let v = Verifier::new(TrustAnchors::amd().unwrap());
        let at = UNIX_EPOCH + Duration::from_secs(1_756_684_800);
        v.verify(
            &report,
            &Endorsements {
                vek,
                ..Default::default()
            },
            at,
        )
        .unwrap()
        .claims()
    }

    fn load(v: Value) -> Result<Policy, PolicyError> {
        Policy::from_value(v)
    }

    #[test]
    fn load_errors_name_the_path() {
        let cases = [
            (
                json!({"rules": {}, "secrets": {}, "extra": 1}),
                "/extra",
                "unknown field",
            ),
            (json!({"secrets": {}}), "/rules", "required"),
            (
                json!({"rules": {"r": {"claim": "nope", "equals": 1}}, "secrets": {}}),
                "/rules/r/claim",
                "unknown claim",
            ),
            (
                json!({"rules": {"r": {"claim": "vmpl", "equals": "0"}}, "secrets": {}}),
                "/rules/r/equals",
                "integer",
            ),
            (
                json!({"rules": {"r": {"claim": "measurement", "equals": "abcd"}}, "secrets": {}}),
                "/rules/r/equals",
                "96 hex digits",
            ),
            (
                json!({"rules": {"r": {"claim": "policy.debug_allowed", "greaterOrEquals": 1}}, "secrets": {}}),
                "/rules/r/greaterOrEquals",
                "integer claims only",
            ),
            (
                json!({"rules": {"r": {"claim": "vmpl", "equals": 0, "in": [0]}}, "secrets": {}}),
                "/rules/r",
                "exactly one operator",
            ),
            (
                json!({"rules": {"r": {"claim": "vmpl", "equal": 0}}, "secrets": {}}),
                "/rules/r/equal",
                "unknown field",
            ),
            (
                json!({"rules": {"r": {"allOf": []}}, "secrets": {}}),
                "/rules/r/allOf",
                "must not be empty",
            ),
            (
                json!({"rules": {"r": {"allOf": [{"claim": "vmpl", "in": [0, "x"]}]}}, "secrets": {}}),
                "/rules/r/allOf/0/in/1",
                "integer",
            ),
            (
                json!({"rules": {"r": {"allOf": [{"claim": "vmpl", "equals": 0}], "anyOf": []}}, "secrets": {}}),
                "/rules/r",
                "exactly one key",
            ),
            (
                json!({"rules": {"r": {"claim": "product", "equals": "Rome"}}, "secrets": {}}),
                "/rules/r/equals",
                "one of Milan",
            ),
            (
                json!({"rules": {"r": {"claim": "vmpl", "equals": 0}}, "secrets": {"s": ["q"]}}),
                "/secrets/s/0",
                "no rule named",
            ),
            (
                json!({"rules": {"r/x": {"claim": "vmpl", "equals": 0}}, "secrets": {}}),
                "/rules/r~1x",
                "rule names",
            ),
        ];
        for (doc, path, message) in cases {
            let e = load(doc.clone()).unwrap_err();
            assert_eq!(e.path, path, "{doc}");
            assert!(e.message.contains(message), "{doc}: {}", e.message);
        }
        // Too deep.
        let mut deep = json!({"claim": "vmpl", "equals": 0});
        for _ in 0..=MAX_DEPTH {
            deep = json!({"allOf": [deep]});
        }
        assert!(load(json!({"rules": {"r": deep}, "secrets": {}})).is_err());
    }

    #[test]
    fn duplicate_keys_are_refused_with_their_path() {
        // The second "secrets" entry would otherwise silently replace the first.
        let twice = r#"{"rules": {"r": {"claim": "vmpl", "equals": 0}},
            "secrets": {"db-key": ["r"], "db-key": []}}"#;
        let e = Policy::from_json(twice).unwrap_err();
        assert_eq!(e.path, "/secrets/db-key", "{e}");
        assert!(e.to_string().contains("twice"), "{e}");
        let nested = r#"{"rules": {"r": {"allOf": [{"claim": "vmpl", "equals": 0, "equals": 1}]}},
            "secrets": {}}"#;
        assert_eq!(
            Policy::from_json(nested).unwrap_err().path,
            "/rules/r/allOf/0/equals"
        );
        let top = r#"{"rules": {}, "rules": {}, "secrets": {}}"#;
        assert_eq!(Policy::from_json(top).unwrap_err().path, "/rules");
        // The same key in different objects is fine.
        let ok = r#"{"rules": {"a": {"claim": "vmpl", "equals": 0}, "b": {"claim": "vmpl", "equals": 0}},
            "secrets": {"s": ["a"], "t": ["a"]}}"#;
        assert!(Policy::from_json(ok).is_ok());
    }

    #[test]
    fn debug_guest_is_refused_and_the_reason_names_the_condition() {
        let policy = load(json!({
            "rules": {
                "no-debug": {"allOf": [
                    {"claim": "policy.debug_allowed", "equals": false},
                    {"claim": "vmpl", "equals": 0}
                ]}
            },
            "secrets": {"web-tls": ["no-debug"]}
        }))
        .unwrap();
        let debug_guest = claims("go-sev-guest-milan-v2");
        let d = policy.decide("web-tls", &debug_guest);
        assert!(!d.released);
        assert_eq!(
            d.reason,
            "rule \"no-debug\": policy.debug_allowed == false (actual true)"
        );
        let ok = policy.decide("web-tls", &claims("trustee-milan-v2"));
        assert!(ok.released, "{}", ok.reason);
        assert_eq!(ok.rule.as_deref(), Some("no-debug"));
        let unknown = policy.decide("other", &claims("trustee-milan-v2"));
        assert!(!unknown.released);
    }

    /// The knobs current advisories call for, as docs/policy.md shows them, on real
    /// Milan and Genoa evidence: a product line refused, a chip deny-list, a TCB floor per
    /// product.
    #[test]
    fn advisory_knobs_on_real_claims() {
        let milan = claims("trustee-milan-v2");
        let genoa = claims("trustee-e2e-genoa-v3");
        assert_eq!(
            (milan.product, genoa.product),
            (crate::Product::Milan, crate::Product::Genoa)
        );
        let decide = |cond: Value, c: &Claims| {
            let p = load(json!({"rules": {"r": cond}, "secrets": {"s": ["r"]}})).unwrap();
            p.decide("s", c)
        };
        // No Milan at all (e.g. after the 2026 seed-extraction research).
        let no_milan = json!({"claim": "product", "notEquals": "Milan"});
        assert!(!decide(no_milan.clone(), &milan).released);
        assert!(decide(no_milan, &genoa).released);
        // A deny-list of chips: refused by ID, others pass; the reason names the list.
        let deny = json!({"claim": "chip_id", "notIn": [milan.chip_id.clone(), "ab".repeat(64)]});
        let d = decide(deny.clone(), &milan);
        assert!(!d.released);
        assert!(d.reason.contains("chip_id not in ["), "{}", d.reason);
        assert!(decide(deny, &genoa).released);
        // A claim the evidence does not carry fails notIn too (fail closed).
        assert!(!decide(json!({"claim": "azure.vm_id", "notIn": ["x"]}), &genoa).released);
        // A TCB floor per product: each guest is held to its own product's floor.
        let floor = |milan_snp: u64, genoa_snp: u64| {
            json!({"anyOf": [
                {"allOf": [{"claim": "product", "equals": "Milan"},
                           {"claim": "tcb.reported.snp", "greaterOrEquals": milan_snp}]},
                {"allOf": [{"claim": "product", "equals": "Genoa"},
                           {"claim": "tcb.reported.snp", "greaterOrEquals": genoa_snp}]}
            ]})
        };
        let (m, g) = (
            u64::from(milan.tcb.reported.snp),
            u64::from(genoa.tcb.reported.snp),
        );
        assert!(decide(floor(m, g), &milan).released);
        assert!(decide(floor(m, g), &genoa).released);
        assert!(!decide(floor(m + 1, g), &milan).released);
        assert!(decide(floor(m + 1, g), &genoa).released);
        assert!(!decide(floor(m, g + 1), &genoa).released);
        // The JSON Schema knows notIn.
        let schema = json_schema();
        let validator = jsonschema::validator_for(&schema).unwrap();
        let doc = json!({"rules": {"r": {"claim": "chip_id", "notIn": ["ab".repeat(64)]}},
                         "secrets": {"s": ["r"]}});
        assert!(validator.is_valid(&doc), "{:?}", validator.validate(&doc));
        let doc = json!({"rules": {"r": {"claim": "chip_id", "notIn": "ab"}}, "secrets": {}});
        assert!(!validator.is_valid(&doc));
        // notIn is checked like in: a non-empty list of the claim's type.
        assert!(
            load(json!({"rules": {"r": {"claim": "chip_id", "notIn": []}}, "secrets": {}}))
                .is_err()
        );
        assert!(
            load(json!({"rules": {"r": {"claim": "chip_id", "notIn": ["ab"]}}, "secrets": {}}))
                .is_err()
        );
    }

    #[test]
    fn operators_on_real_claims() {
        let c = claims("trustee-aws-vlek-milan-v3");
        let check = |cond: Value| {
            let p = load(json!({"rules": {"r": cond}, "secrets": {"s": ["r"]}})).unwrap();
            p.decide("s", &c).released
        };
        assert!(check(json!({"claim": "vmpl", "equals": 1})));
        assert!(!check(json!({"claim": "vmpl", "notEquals": 1})));
        assert!(check(json!({"claim": "vmpl", "in": [0, 1]})));
        assert!(check(
            json!({"claim": "tcb.reported.microcode", "greaterOrEquals": 217})
        ));
        assert!(!check(
            json!({"claim": "tcb.reported.microcode", "greaterOrEquals": 218})
        ));
        assert!(check(
            json!({"claim": "tcb.reported.snp", "lessOrEquals": 24})
        ));
        assert!(check(json!({"claim": "signing_key", "equals": "vlek"})));
        assert!(check(json!({"claim": "csp_id", "exists": true})));
        assert!(check(
            json!({"claim": "azure.secure_boot", "exists": false})
        ));
        // Absent claims fail every comparison, notEquals included (fail closed).
        assert!(!check(
            json!({"claim": "azure.secure_boot", "equals": true})
        ));
        assert!(!check(
            json!({"claim": "azure.secure_boot", "notEquals": true})
        ));
        assert!(!check(
            json!({"claim": "tcb.reported.fmc", "greaterOrEquals": 0})
        ));
        // Hex is compared case-insensitively.
        let m = c.measurement.to_ascii_uppercase();
        assert!(check(json!({"claim": "measurement", "equals": m})));
        assert!(check(json!({"anyOf": [
            {"claim": "vmpl", "equals": 3},
            {"claim": "product", "equals": "Milan"}
        ]})));
    }

    #[test]
    fn suggested_policy_accepts_its_report_and_nothing_else() {
        let c = claims("trustee-milan-v2");
        let draft = suggest(&c, "suggested", &["web-tls".to_string()]);
        let p = load(draft).unwrap();
        assert!(p.decide("web-tls", &c).released);
        let other = claims("virtee-sev-milan-v2");
        let d = p.decide("web-tls", &other);
        assert!(!d.released);
        assert!(d.reason.contains("measurement =="), "{}", d.reason);
    }

    #[test]
    fn a_policy_from_a_computed_measurement_accepts_exactly_that_guest_on_that_tcb() {
        let c = claims("trustee-milan-v2");
        let measurement: [u8; 48] = hex::decode(&c.measurement).unwrap().try_into().unwrap();
        let secrets = ["web-tls".to_string()];
        let draft = |tcb: &crate::report::Tcb| {
            suggest_from_measurement(&measurement, c.product, tcb, c.vmpl, "measured", &secrets)
        };
        let p = load(draft(&c.tcb.reported)).unwrap();
        assert!(p.decide("web-tls", &c).released);
        // Another guest's measurement: refused on it.
        let d = p.decide("web-tls", &claims("virtee-sev-milan-v2"));
        assert!(!d.released);
        assert!(d.reason.contains("measurement =="), "{}", d.reason);
        // A platform below the minimum given: refused on the TCB.
        let mut higher = c.tcb.reported;
        higher.snp += 1;
        let d = load(draft(&higher)).unwrap().decide("web-tls", &c);
        assert!(!d.released);
        assert!(d.reason.contains("tcb.reported.snp"), "{}", d.reason);
        // The draft says where its measurement came from.
        let text = draft(&c.tcb.reported)["description"].to_string();
        assert!(text.contains("computed from the image"), "{text}");
    }

    #[test]
    fn schema_accepts_good_policies_and_rejects_bad_ones() {
        let schema = json_schema();
        let validator = jsonschema::validator_for(&schema).unwrap();
        let good = suggest(&claims("trustee-milan-v2"), "suggested", &["s".to_string()]);
        assert!(validator.is_valid(&good), "{:?}", validator.validate(&good));
        let bad = [
            json!({"rules": {"r": {"claim": "nope", "equals": 1}}, "secrets": {}}),
            json!({"rules": {"r": {"claim": "vmpl", "equals": "x"}}, "secrets": {}}),
            json!({"rules": {"r": {"claim": "measurement", "equals": "ab"}}, "secrets": {}}),
            json!({"rules": {"r": {"claim": "vmpl", "equals": 0, "exists": true}}, "secrets": {}}),
            json!({"rules": {"r": {"allOf": []}}, "secrets": {}}),
            json!({"rules": {}, "secrets": {}, "x": 1}),
            // Certificate profiles: no name granted, no usage, a bad usage, a deep wildcard,
            // an unknown field, a lifetime out of range.
            json!({"rules": {}, "secrets": {}, "certificates": {"c": {"rules": [], "usages": ["serverAuth"]}}}),
            json!({"rules": {}, "secrets": {}, "certificates": {"c": {"rules": [], "dns": ["a.b"]}}}),
            json!({"rules": {}, "secrets": {}, "certificates": {"c": {"rules": [], "dns": ["a.b"], "usages": ["any"]}}}),
            json!({"rules": {}, "secrets": {}, "certificates": {"c": {"rules": [], "dns": ["*.*.b"], "usages": ["serverAuth"]}}}),
            json!({"rules": {}, "secrets": {}, "certificates": {"c": {"rules": [], "dns": ["a.b"], "usages": ["serverAuth"], "ttl": 1}}}),
            json!({"rules": {}, "secrets": {}, "certificates": {"c": {"rules": [], "dns": ["a.b"], "usages": ["serverAuth"], "max_lifetime_hours": 2161}}}),
        ];
        let mut good = good;
        good["certificates"] = json!({"web": {
            "rules": ["suggested"], "dns": ["web.internal", "*.svc.internal"],
            "ip": ["10.0.0.0/8"], "uri": ["spiffe://example.org/web"],
            "usages": ["serverAuth", "clientAuth"], "max_lifetime_hours": 24
        }});
        assert!(validator.is_valid(&good), "{:?}", validator.validate(&good));
        assert!(load(good).is_ok());
        for doc in bad {
            assert!(!validator.is_valid(&doc), "schema accepted {doc}");
            assert!(load(doc).is_err());
        }
        // Every claim in the table is reachable in the schema.
        let text = schema.to_string();
        for (name, _) in CLAIMS {
            assert!(text.contains(&format!("\"{name}\"")), "{name}");
        }
    }

    #[test]
    fn every_claim_name_resolves_in_a_full_claims_document() {
        // Names must be real paths of Claims' JSON (Azure and v5-only claims aside).
        let c = claims("trustee-e2e-genoa-v3").to_json();
        for (name, _) in CLAIMS {
            if name.starts_with("azure.")
                || name.starts_with("tpm.")
                || name.starts_with("mitigation_vector.")
                || name.ends_with(".fmc")
                || *name == "csp_id"
            {
                continue;
            }
            assert!(lookup(&c, name).is_some(), "{name} is not in the claims");
        }
    }
}
