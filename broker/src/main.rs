//! The `broker` command: server and operator CLI in one binary.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use clap::{Parser, Subcommand};

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
        /// Raw 1184-byte attestation report, or an Azure vTPM HCL report (detected).
        #[arg(long)]
        report: PathBuf,
        /// VCEK or VLEK certificate, DER or PEM.
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
        /// Print the claims as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn parse_time(s: &str) -> anyhow::Result<SystemTime> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| anyhow::anyhow!("--at {s:?} is not an RFC 3339 time: {e}"))?;
    Ok(t.into())
}

#[allow(clippy::print_stdout)]
fn verify(
    report: PathBuf,
    vek: Option<PathBuf>,
    chain: Option<PathBuf>,
    crl: Vec<PathBuf>,
    at: Option<String>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let at = match at {
        Some(s) => parse_time(&s)?,
        None => SystemTime::now(),
    };
    let request = VerifyRequest {
        report,
        vek,
        chain,
        crls: crl,
        at,
    };
    match verify_cmd::run(&request) {
        Ok(claims) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&claims.to_json())?);
            } else {
                print!("{}", verify_cmd::summary(&claims));
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(broker::Error::Refused(e)) => {
            if json {
                let refusal = serde_json::json!({
                    "verified": false,
                    "check": e.check(),
                    "reason": e.to_string(),
                });
                println!("{refusal}");
            }
            eprintln!("refused: {e}");
            Ok(ExitCode::from(1))
        }
        Err(e) => Err(e.into()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Verify {
            report,
            vek,
            chain,
            crl,
            at,
            json,
        } => verify(report, vek, chain, crl, at, json),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
