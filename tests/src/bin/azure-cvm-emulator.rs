//! Runs an emulated Azure confidential VM (swtpm vTPM, paravisor, THIM) on loopback until
//! interrupted or its standard input closes, for trying the guest agent's `azure-vtpm`
//! platform without Azure. Prints the agent's `[azure]` settings.
//!
//! ```text
//! azure-cvm-emulator --sim-dir DIR [--foreign-attestation-key] [--tamper-var-data]
//! ```
//!
//! `DIR` is the `sim/` directory of `broker init --dev` (the simulated AMD hierarchy that
//! signs the VCEK).

use std::io::Read;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use e2e::azure::{AzureCvm, Faults, Options};

/// An emulated Azure confidential VM on 127.0.0.1.
#[derive(Parser)]
struct Args {
    /// The `sim/` directory written by `broker init --dev`.
    #[arg(long)]
    sim_dir: PathBuf,
    /// Publish another RSA key than the vTPM's attestation key in the HCL report.
    #[arg(long)]
    foreign_attestation_key: bool,
    /// Alter the HCL variable data after the SNP report was signed over it.
    #[arg(long)]
    tamper_var_data: bool,
}

#[allow(clippy::print_stdout)]
fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let amd =
        guest_agent::evidence::load_simulated_amd(&args.sim_dir, attestation::Product::Genoa)?;
    let cvm = AzureCvm::start(
        &amd,
        Options {
            faults: Faults {
                foreign_attestation_key: args.foreign_attestation_key,
                tamper_var_data: args.tamper_var_data,
            },
            ..Options::default()
        },
    )
    .map_err(anyhow::Error::msg)
    .context("starting the emulated Azure CVM (needs swtpm: make deps)")?;
    println!("[azure]");
    println!("tcti = \"{}\"", cvm.tcti());
    println!("thim_url = \"{}\"", cvm.thim_url());
    eprintln!("azure-cvm-emulator: running; close stdin or interrupt to stop");
    // Run until stdin closes (or the process is killed; Drop stops swtpm either way).
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(cvm);
    Ok(())
}
