//! `broker policy schema | check | suggest`: the release policy from the command line.

use std::path::Path;

use attestation::policy::{self, Decision, Outcome, Policy};

use crate::Error;
use crate::evidence::read_bounded;
use crate::verify_cmd::{self, VerifyRequest};

/// Loads a policy file, with the file name in any error.
pub fn load(path: &Path) -> Result<Policy, Error> {
    let bytes = read_bounded(path)?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| Error::Input(format!("{}: not UTF-8", path.display())))?;
    Policy::from_json(text).map_err(|e| Error::Input(format!("{}: {e}", path.display())))
}

/// The outcome of `broker policy check`: verification succeeded and each secret's decision.
#[derive(Debug, serde::Serialize)]
pub struct CheckReport {
    /// The verified report's launch measurement (hex).
    pub measurement: String,
    /// Decisions, one per secret checked.
    pub decisions: Vec<Decision>,
}

/// Verifies the evidence, then evaluates the policy for `secrets` (every secret and
/// certificate profile the policy names when empty; a certificate profile is named
/// `certificate:<profile>`).
pub fn check(
    request: &VerifyRequest,
    policy: &Policy,
    secrets: &[String],
) -> Result<CheckReport, Error> {
    let verified = verify_cmd::verify(request)?;
    let claims = verified.claims();
    let names: Vec<String> = if secrets.is_empty() {
        policy
            .secrets()
            .map(str::to_string)
            .chain(
                policy
                    .certificate_profiles()
                    .map(|(p, _)| format!("{CERTIFICATE_PREFIX}{p}")),
            )
            .collect()
    } else {
        secrets.to_vec()
    };
    if names.is_empty() {
        return Err(Error::Input(
            "the policy maps no secrets; name one with --secret".into(),
        ));
    }
    let json = claims.to_json();
    let decisions = names
        .iter()
        .map(|name| match name.strip_prefix(CERTIFICATE_PREFIX) {
            Some(profile) => {
                let mut d = policy.decide_certificate(profile, &json);
                if let (true, Some(p)) = (d.released, policy.certificate_profile(profile)) {
                    d.reason = format!("{}; grants {}", d.reason, p.describe());
                }
                d
            }
            None => policy.decide(name, &claims),
        })
        .collect();
    Ok(CheckReport {
        measurement: claims.measurement.clone(),
        decisions,
    })
}

/// How `policy check --secret` names a certificate profile.
pub const CERTIFICATE_PREFIX: &str = "certificate:";

/// Adds certificate profiles to a drafted policy: each `PROFILE=NAME,NAME…` (names as
/// `dns:…`, `ip:…`, `uri:…`) granted by the draft's rule `rule`, for server and client use,
/// with the default lifetime.
pub fn add_certificate_profiles(
    draft: &mut serde_json::Value,
    rule: &str,
    profiles: &[String],
) -> Result<(), Error> {
    if profiles.is_empty() {
        return Ok(());
    }
    let mut out = serde_json::Map::new();
    for spec in profiles {
        let (name, names) = spec.split_once('=').ok_or_else(|| {
            Error::Input(format!(
                "--certificate {spec:?}: PROFILE=dns:NAME,uri:URI,ip:ADDRESS"
            ))
        })?;
        let (mut dns, mut ip, mut uri) = (Vec::new(), Vec::new(), Vec::new());
        for n in names.split(',').filter(|n| !n.is_empty()) {
            match n.split_once(':') {
                Some(("dns", v)) => dns.push(v.to_string()),
                Some(("ip", v)) => ip.push(v.to_string()),
                Some(("uri", v)) => uri.push(v.to_string()),
                _ => {
                    return Err(Error::Input(format!(
                        "--certificate {spec:?}: {n:?} is not dns:…, ip:… or uri:…"
                    )));
                }
            }
        }
        let mut profile = serde_json::json!({
            "rules": [rule],
            "usages": ["serverAuth", "clientAuth"],
            "max_lifetime_hours": policy::certificates::DEFAULT_LIFETIME_HOURS,
        });
        for (key, list) in [("dns", dns), ("ip", ip), ("uri", uri)] {
            if !list.is_empty() {
                profile[key] = serde_json::json!(list);
            }
        }
        out.insert(name.to_string(), profile);
    }
    draft["certificates"] = serde_json::Value::Object(out);
    Policy::from_value(draft.clone()).map_err(|e| Error::Input(format!("drafted policy: {e}")))?;
    Ok(())
}

fn render_outcome(o: &Outcome, depth: usize, out: &mut String) {
    let mark = if o.passed { "pass" } else { "FAIL" };
    out.push_str(&format!(
        "{}{mark}  {}\n",
        "  ".repeat(depth + 2),
        o.description
    ));
    for c in &o.children {
        render_outcome(c, depth + 1, out);
    }
}

/// Whether a measurement condition failed somewhere under `o`.
fn measurement_failed(o: &Outcome) -> bool {
    (!o.passed && o.children.is_empty() && o.description.starts_with("measurement"))
        || o.children.iter().any(measurement_failed)
}

/// Renders a check report for people.
pub fn render(report: &CheckReport) -> String {
    let mut out = String::new();
    let refused_on_measurement = report
        .decisions
        .iter()
        .any(|d| !d.released && d.rules.iter().any(|r| measurement_failed(&r.conditions)));
    for d in &report.decisions {
        let verdict = if d.released { "RELEASE" } else { "REFUSE" };
        out.push_str(&format!("{verdict} {}: {}\n", d.secret, d.reason));
        for r in &d.rules {
            out.push_str(&format!(
                "  rule {} {}\n",
                r.rule,
                if r.passed { "holds" } else { "fails" }
            ));
            render_outcome(&r.conditions, 0, &mut out);
        }
    }
    if refused_on_measurement {
        out.push_str(&format!(
            "hint: to see whether the image you expect gives this measurement on another vCPU \
             count, CPU family or guest features: broker measure --ovmf FILE [--kernel …] \
             --match {}\n",
            report.measurement
        ));
    }
    out
}

/// Drafts a strict policy from verified evidence, or, when no VCEK/VLEK is given, from the
/// unverified report (the draft and a warning say so).
pub fn suggest(request: &VerifyRequest, secrets: &[String]) -> Result<serde_json::Value, Error> {
    let draft = if request.vek.is_some() {
        let claims = verify_cmd::verify(request)?.claims();
        policy::suggest(&claims, "suggested", secrets)
    } else {
        let report = match crate::evidence::read_report(&request.report)? {
            crate::evidence::ReportInput::Raw(bytes) => {
                attestation::AttestationReport::parse(&bytes)?
            }
            crate::evidence::ReportInput::Hcl(hcl) => {
                attestation::AttestationReport::parse(hcl.snp_report())?
            }
        };
        tracing::warn!(
            "no --vek: drafting from the UNVERIFIED report; pass --vek to verify it first"
        );
        policy::suggest_unverified(&report, "suggested", secrets)
    };
    // The draft must load: a suggestion that the broker would refuse is a bug.
    Policy::from_value(draft.clone()).map_err(|e| Error::Input(format!("drafted policy: {e}")))?;
    Ok(draft)
}

/// Drafts a policy from a computed launch measurement (`broker measure`): 96 hex digits, the
/// product the guests run on, and the TCB minimums as `bootloader=N,tee=N,snp=N,microcode=N`
/// (plus `fmc=N` on Turin), since no report says what the platform runs.
pub fn suggest_measured(
    measurement: &str,
    product: &str,
    min_tcb: &str,
    vmpl: u32,
    secrets: &[String],
) -> Result<serde_json::Value, Error> {
    let input = |m: String| Error::Input(m);
    let measurement: [u8; 48] = hex::decode(measurement.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| input("--measurement: 96 hex digits (broker measure prints it)".into()))?;
    let product = attestation::Product::from_name(product).ok_or_else(|| {
        input(format!(
            "--product {product:?}: one of Milan, Genoa, Turin (the hosts' EPYC generation)"
        ))
    })?;
    if vmpl > 3 {
        return Err(input(format!("--vmpl {vmpl}: 0 to 3")));
    }
    let tcb = parse_tcb(min_tcb, product)?;
    let draft =
        policy::suggest_from_measurement(&measurement, product, &tcb, vmpl, "measured", secrets);
    Policy::from_value(draft.clone()).map_err(|e| Error::Input(format!("drafted policy: {e}")))?;
    Ok(draft)
}

/// `bootloader=N,tee=N,snp=N,microcode=N[,fmc=N]`: every component, each once; `fmc` on
/// Turin (required there) only.
fn parse_tcb(text: &str, product: attestation::Product) -> Result<attestation::report::Tcb, Error> {
    let bad = |m: String| Error::Input(format!("--min-tcb: {m}"));
    let mut values: std::collections::BTreeMap<&str, u8> = std::collections::BTreeMap::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| bad(format!("{part:?} is not NAME=N")))?;
        let key = key.trim();
        if !matches!(key, "bootloader" | "tee" | "snp" | "microcode" | "fmc") {
            return Err(bad(format!(
                "unknown component {key:?} (bootloader, tee, snp, microcode, fmc)"
            )));
        }
        let value: u8 = value
            .trim()
            .parse()
            .map_err(|_| bad(format!("{key}: 0 to 255")))?;
        if values.insert(key, value).is_some() {
            return Err(bad(format!("{key} given twice")));
        }
    }
    let get = |key: &str| {
        values.get(key).copied().ok_or_else(|| {
            bad(format!(
                "{key} missing (give bootloader, tee, snp and microcode)"
            ))
        })
    };
    let turin = product == attestation::Product::Turin;
    let fmc = match (values.get("fmc").copied(), turin) {
        (Some(v), true) => Some(v),
        (None, true) => {
            return Err(bad(
                "fmc missing: Turin's TCB has a firmware (FMC) SPL".into()
            ));
        }
        (Some(_), false) => return Err(bad("fmc is a Turin component".into())),
        (None, false) => None,
    };
    Ok(attestation::report::Tcb {
        fmc,
        bootloader: get("bootloader")?,
        tee: get("tee")?,
        snp: get("snp")?,
        microcode: get("microcode")?,
    })
}
