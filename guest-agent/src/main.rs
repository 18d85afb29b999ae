//! `guest-agent`: fetch this VM's secrets from the key broker at boot.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use guest_agent::config::{DEFAULT_CONFIG, Settings};
use guest_agent::{AgentError, evidence, flow};

#[derive(Parser)]
#[command(
    name = "guest-agent",
    version,
    about = "Fetch this confidential VM's secrets from the key broker"
)]
struct Cli {
    /// Configuration file.
    #[arg(long, global = true, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// Log details (protocol steps, retries).
    #[arg(long, short, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Attest and write every secret (the default).
    Run,
    /// Run the whole flow except writing: report what would be written.
    Check,
    /// Renew the `[[certificate]]`s that are due (two thirds of their lifetime, missing,
    /// expired or revoked) with fresh evidence, refresh their OCSP responses, and run their
    /// reload commands if anything changed. Run by guest-agent-renew.timer.
    Renew {
        /// Renew every certificate now, due or not.
        #[arg(long)]
        force: bool,
    },
    /// Check the configuration file and exit (0 when it is valid).
    ConfigCheck,
    /// Get a report (REPORT_DATA zero unless --data) and its certificates, for
    /// `broker policy suggest`.
    Report {
        /// Write the raw report here (default: hex on stdout); certificates go to FILE.certs.pem.
        #[arg(long)]
        out: Option<PathBuf>,
        /// REPORT_DATA, 128 hex digits.
        #[arg(long)]
        data: Option<String>,
    },
}

#[allow(clippy::print_stdout)]
async fn main_inner(cli: Cli) -> Result<(), AgentError> {
    let settings = Settings::load(&cli.config)?;
    let command = cli.command.unwrap_or(Command::Run);
    if matches!(command, Command::ConfigCheck) {
        println!(
            "{}: valid ({} secrets, platform {:?})",
            cli.config.display(),
            settings.secrets.len(),
            settings.platform
        );
        return Ok(());
    }
    let source = evidence::select(&settings)?;
    let write = !matches!(command, Command::Check);
    match command {
        Command::Report { out, data } => {
            let mut rd = [0u8; 64];
            if let Some(d) = data {
                hex::decode_to_slice(&d, &mut rd)
                    .map_err(|_| AgentError::Config("--data: 128 hex digits".into()))?;
            }
            let mut ev = source.report(rd)?;
            if ev.quote.is_some()
                && ev.certificates.is_empty()
                && let Some(url) = &settings.azure.thim_url
            {
                ev.certificates = guest_agent::azure::thim_certificates(url, &ev.report).await;
            }
            match out {
                None => println!("{}", hex::encode(&ev.report)),
                Some(path) => {
                    std::fs::write(&path, &ev.report)
                        .map_err(|e| AgentError::Write(format!("{}: {e}", path.display())))?;
                    if let Some(quote) = &ev.quote {
                        // Azure: `path` holds the HCL report; the quote goes beside it, in the
                        // form `broker verify --quote` reads.
                        let quote_path = PathBuf::from(format!("{}.quote.json", path.display()));
                        let json = serde_json::to_string_pretty(
                            &attestation::protocol::TpmQuote::encode(quote),
                        )
                        .map_err(|e| AgentError::Evidence(e.to_string()))?;
                        std::fs::write(&quote_path, json).map_err(|e| {
                            AgentError::Write(format!("{}: {e}", quote_path.display()))
                        })?;
                        println!("wrote {}", quote_path.display());
                    }
                    let mut pem = String::new();
                    // VCEK/VLEK first, then the rest: the order `broker verify --vek` expects.
                    let mut certs = ev.certificates.clone();
                    certs.sort_by_key(|c| !(c.kind == "vcek" || c.kind == "vlek"));
                    for c in &certs {
                        let der = attestation::protocol::decode_b64(&c.der, "certificate")
                            .map_err(|e| AgentError::Evidence(e.to_string()))?;
                        pem.push_str(&attestation::certs::to_pem(&der));
                    }
                    if !pem.is_empty() {
                        let certs_path = PathBuf::from(format!("{}.certs.pem", path.display()));
                        std::fs::write(&certs_path, pem).map_err(|e| {
                            AgentError::Write(format!("{}: {e}", certs_path.display()))
                        })?;
                        println!("wrote {} and {}", path.display(), certs_path.display());
                    } else {
                        println!(
                            "wrote {} (the platform returned no certificates)",
                            path.display()
                        );
                    }
                }
            }
            Ok(())
        }
        Command::ConfigCheck => Ok(()),
        Command::Renew { force } => {
            if settings.certificates.is_empty() {
                return Err(AgentError::Config(
                    "renew: the configuration has no [[certificate]]".into(),
                ));
            }
            let agent = flow::Agent::new(settings.clone(), source)?;
            let renewal =
                guest_agent::renew::renew(&settings, &agent, force, std::time::SystemTime::now())
                    .await?;
            for line in &renewal.lines {
                println!("{line}");
            }
            if renewal.failures.is_empty() {
                Ok(())
            } else {
                Err(AgentError::Renew(renewal.failures.join("; ")))
            }
        }
        Command::Check | Command::Run => {
            tracing::info!(brokers = ?settings.brokers, source = source.name(), "attesting");
            let agent = flow::Agent::new(settings.clone(), source)?;
            let summary = guest_agent::run(&settings, &agent, write).await?;
            for (name, version, path, bytes) in &summary.written {
                let verb = if write { "wrote" } else { "would write" };
                println!(
                    "{verb} {name} v{version} ({bytes} bytes) to {}",
                    path.display()
                );
            }
            for (name, serial, not_after, path) in &summary.certificates {
                let verb = if write { "wrote" } else { "would write" };
                println!(
                    "{verb} certificate {name} (serial {serial}, valid until {}) to {}",
                    attestation::error::rfc3339(&u64::try_from(*not_after).unwrap_or(0)),
                    path.display()
                );
            }
            for line in &summary.staples {
                println!("{line}");
            }
            for (name, reason) in &summary.missing_optional {
                println!("warning: optional secret {name} not obtained: {reason}");
            }
            Ok(())
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = if cli.verbose { "debug" } else { "info" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match main_inner(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("guest-agent: {e}");
            ExitCode::from(match e {
                AgentError::Config(_) => 2,
                _ => 1,
            })
        }
    }
}
