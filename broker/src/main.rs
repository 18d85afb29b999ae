//! The `broker` command: server and operator CLI in one binary.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use clap::{Args, Parser, Subcommand};

use broker::policy_cmd;
use broker::verify_cmd::{self, VerifyRequest};

#[derive(Parser)]
#[command(
    name = "broker",
    version,
    about = "Key broker for AMD SEV-SNP confidential VMs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Verify SEV-SNP evidence offline against AMD's pinned roots and print its claims.
    ///
    /// Exit status: 0 verified, 1 refused (one line naming the failed check), 2 unusable input.
    Verify {
        #[command(flatten)]
        evidence: EvidenceArgs,
        /// Print the claims as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Release policies: schema, explanation of a decision, drafting from a report.
    #[command(subcommand)]
    Policy(PolicyCommand),
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Print the JSON Schema of release policies.
    Schema,
    /// Verify evidence and explain, condition by condition, what the policy decides.
    ///
    /// Exit status: 0 every secret checked would be released, 1 refused, 2 unusable input.
    Check {
        #[command(flatten)]
        evidence: EvidenceArgs,
        /// The policy file to evaluate.
        #[arg(long)]
        policy: PathBuf,
        /// Secret to decide on (repeatable; default: every secret the policy names).
        #[arg(long)]
        secret: Vec<String>,
        /// Print the decisions as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Draft a strict policy from verified evidence: its measurement, debugging and migration
    /// agent off, its VMPL, and its reported TCB as the floor.
    Suggest {
        #[command(flatten)]
        evidence: EvidenceArgs,
        /// Secret the drafted rule may receive (repeatable).
        #[arg(long)]
        secret: Vec<String>,
    },
}

#[derive(Args)]
struct EvidenceArgs {
    /// Raw 1184-byte attestation report, or an Azure vTPM HCL report (detected).
    #[arg(long)]
    report: PathBuf,
    /// VCEK or VLEK certificate, DER or PEM (a PEM bundle: VCEK first, then its chain).
    #[arg(long)]
    vek: Option<PathBuf>,
    /// AMD KDS cert_chain PEM: ASK or ASVK, then ARK (optional: AMD's are built in).
    #[arg(long)]
    chain: Option<PathBuf>,
    /// CRL signed by the ARK, DER or PEM (repeatable).
    #[arg(long)]
    crl: Vec<PathBuf>,
    /// Verification time, RFC 3339 (default: now).
    #[arg(long)]
    at: Option<String>,
}

impl EvidenceArgs {
    fn request(self) -> anyhow::Result<VerifyRequest> {
        let at = match &self.at {
            Some(s) => {
                let t =
                    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                        .map_err(|e| anyhow::anyhow!("--at {s:?} is not an RFC 3339 time: {e}"))?;
                SystemTime::from(t)
            }
            None => SystemTime::now(),
        };
        Ok(VerifyRequest {
            report: self.report,
            vek: self.vek,
            chain: self.chain,
            crls: self.crl,
            at,
        })
    }
}

/// What a command ended with: success, a refusal (exit 1), or unusable input (exit 2).
enum Outcome {
    Done,
    Refused,
}

/// Prints a refusal: one line on stderr, and with `--json` an object on stdout.
#[allow(clippy::print_stdout)]
fn refused(e: &attestation::Error, json: bool) -> Outcome {
    if json {
        let refusal = serde_json::json!({
            "verified": false,
            "check": e.check(),
            "reason": e.to_string(),
        });
        println!("{refusal}");
    }
    eprintln!("refused: {e}");
    Outcome::Refused
}

#[allow(clippy::print_stdout)]
fn run(command: Command) -> anyhow::Result<Outcome> {
    match command {
        Command::Verify { evidence, json } => match verify_cmd::run(&evidence.request()?) {
            Ok(claims) => {
                if json {
                    println!("{}", serde_json::to_string_pretty(&claims.to_json())?);
                } else {
                    print!("{}", verify_cmd::summary(&claims));
                }
                Ok(Outcome::Done)
            }
            Err(broker::Error::Refused(e)) => Ok(refused(&e, json)),
            Err(e) => Err(e.into()),
        },
        Command::Policy(PolicyCommand::Schema) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&attestation::policy::json_schema())?
            );
            Ok(Outcome::Done)
        }
        Command::Policy(PolicyCommand::Check {
            evidence,
            policy,
            secret,
            json,
        }) => {
            let policy = policy_cmd::load(&policy)?;
            match policy_cmd::check(&evidence.request()?, &policy, &secret) {
                Ok(report) => {
                    if json {
                        println!("{}", serde_json::to_string_pretty(&report)?);
                    } else {
                        print!("{}", policy_cmd::render(&report));
                    }
                    let all = report.decisions.iter().all(|d| d.released);
                    Ok(if all { Outcome::Done } else { Outcome::Refused })
                }
                Err(broker::Error::Refused(e)) => Ok(refused(&e, json)),
                Err(e) => Err(e.into()),
            }
        }
        Command::Policy(PolicyCommand::Suggest { evidence, secret }) => {
            match policy_cmd::suggest(&evidence.request()?, &secret) {
                Ok(draft) => {
                    println!("{}", serde_json::to_string_pretty(&draft)?);
                    if secret.is_empty() {
                        eprintln!(
                            "note: the draft maps no secrets; add them under \"secrets\" or pass --secret NAME"
                        );
                    }
                    Ok(Outcome::Done)
                }
                Err(broker::Error::Refused(e)) => Ok(refused(&e, false)),
                Err(e) => Err(e.into()),
            }
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(Outcome::Done) => ExitCode::SUCCESS,
        Ok(Outcome::Refused) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
