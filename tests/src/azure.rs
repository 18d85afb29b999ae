//! An emulated Azure confidential VM for end-to-end tests: a real TPM (`swtpm`) provisioned
//! the way Azure's paravisor provisions the vTPM, a paravisor that regenerates the HCL report
//! when the guest writes user data, and Azure's THIM endpoint serving the VCEK.
//!
//! Layout:
//!
//! ```text
//!  guest agent ──swtpm TCTI──▶ 127.0.0.1:P (commands)  ──┐ one upstream connection,
//!                             127.0.0.1:P+1 (control) ──┼─▶ swtpm (unix sockets)
//!  paravisor thread ──swtpm TCTI──▶ 127.0.0.1:P ─────────┘ commands serialised
//! ```
//!
//! swtpm serves one client at a time, so a small multiplexer forwards whole commands from
//! every client over one upstream connection. It also watches for a successful
//! `TPM2_NV_Write` to NV index 0x01400002 and wakes the paravisor, which reads the user data,
//! signs a fresh SNP report with the simulated VCEK (REPORT_DATA = SHA-256 of the variable
//! data, which carries the user data and the attestation key) and writes the HCL report to
//! NV index 0x01400001. The attestation key is a real restricted RSA-2048 signing key
//! (RSASSA-SHA256) created in the TPM and persisted at 0x81000003.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use attestation::sim::{AzureVmConfig, ReportFields, SimulatedAmd, SimulatedKey};
use guest_agent::azure;
use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::handles::PersistentTpmHandle;
use tss_esapi::interface_types::algorithm::{
    HashingAlgorithm, PublicAlgorithm, RsaSchemeAlgorithm,
};
use tss_esapi::interface_types::dynamic_handles::Persistent;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::resource_handles::{Hierarchy, Provision};
use tss_esapi::structures::{
    Digest, DigestValues, Public, PublicBuilder, PublicKeyRsa, PublicRsaParametersBuilder,
    RsaExponent, RsaScheme,
};

/// TPM2_CC_NV_Write.
const CC_NV_WRITE: u32 = 0x0000_0137;
/// Size of the emulated HCL report NV index (swtpm's per-index limit).
const HCL_INDEX_SIZE: usize = 2048;
/// Largest TPM command or response forwarded.
const MAX_FRAME: usize = 8192;

/// What the emulated platform does differently from a faithful Azure CVM.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// The variable data names another RSA key than the one at 0x81000003, so quotes are
    /// signed by a key the HCL report does not vouch for.
    pub foreign_attestation_key: bool,
    /// The paravisor changes the variable data after the SNP report was signed over it.
    pub tamper_var_data: bool,
}

/// Settings of the emulated VM.
#[derive(Clone, Debug)]
pub struct Options {
    /// Report fields (REPORT_DATA is overwritten by the paravisor).
    pub fields: ReportFields,
    /// The VM configuration the paravisor reports.
    pub vm: AzureVmConfig,
    /// Extra PCR extensions at "boot": (PCR, SHA-256 digest).
    pub extend: Vec<(u8, [u8; 32])>,
    /// Misbehaviour.
    pub faults: Faults,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            fields: ReportFields::new(attestation::Product::Genoa),
            vm: AzureVmConfig::default(),
            extend: Vec::new(),
            faults: Faults::default(),
        }
    }
}

/// A running emulated Azure CVM. Dropping it stops swtpm and the servers.
pub struct AzureCvm {
    swtpm: Child,
    dir: tempfile::TempDir,
    port: u16,
    thim_port: u16,
    regenerations: Arc<Mutex<u64>>,
}

impl AzureCvm {
    /// The TCTI string the guest agent uses to reach the emulated vTPM.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// The URL of the emulated THIM endpoint.
    pub fn thim_url(&self) -> String {
        format!(
            "http://127.0.0.1:{}/metadata/THIM/amd/certification",
            self.thim_port
        )
    }

    /// How many times the paravisor regenerated the HCL report.
    pub fn regenerations(&self) -> u64 {
        self.regenerations.lock().map(|g| *g).unwrap_or(0)
    }

    /// swtpm's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("swtpm.log")).unwrap_or_default()
    }

    /// Starts swtpm, the multiplexer, the paravisor and THIM, and provisions the vTPM:
    /// attestation key, PCRs and an initial HCL report. `amd` signs the VCEK.
    pub fn start(amd: &SimulatedAmd, options: Options) -> Result<AzureCvm, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let state = dir.path().join("state");
        std::fs::create_dir(&state).map_err(|e| e.to_string())?;
        let data_sock = dir.path().join("data.sock");
        let ctrl_sock = dir.path().join("ctrl.sock");
        let swtpm = Command::new("swtpm")
            .arg("socket")
            .arg("--tpm2")
            .arg("--tpmstate")
            .arg(format!("dir={}", state.display()))
            .arg("--server")
            .arg(format!("type=unixio,path={}", data_sock.display()))
            .arg("--ctrl")
            .arg(format!("type=unixio,path={}", ctrl_sock.display()))
            .arg("--flags")
            .arg("not-need-init,startup-clear")
            // Exit when the multiplexer's connection drops: no orphan if this process dies.
            .arg("--terminate")
            .arg("--log")
            .arg(format!("file={}", dir.path().join("swtpm.log").display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run swtpm (apt-get install swtpm): {e}"))?;
        let mut cvm = AzureCvm {
            swtpm,
            port: 0,
            thim_port: 0,
            regenerations: Arc::new(Mutex::new(0)),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(data_sock.exists() && ctrl_sock.exists()) {
            if Instant::now() > deadline {
                return Err(format!("swtpm did not start: {}", cvm.log()));
            }
            thread::sleep(Duration::from_millis(20));
        }
        let upstream = UnixStream::connect(&data_sock).map_err(|e| e.to_string())?;
        let (data, ctrl) = consecutive_listeners()?;
        cvm.port = data.local_addr().map_err(|e| e.to_string())?.port();
        let (trigger_tx, trigger_rx) = mpsc::channel::<()>();
        serve_mux(data, upstream, trigger_tx);
        serve_ctrl(ctrl, ctrl_sock);

        let vcek = amd
            .issue_vcek(
                &options.fields.chip_id,
                options.fields.tcb,
                SystemTime::now() - Duration::from_secs(3600),
            )
            .map_err(|e| e.to_string())?;
        cvm.thim_port = serve_thim(amd, &vcek, &options.fields)?;

        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let tcti = cvm.tcti();
        let regenerations = cvm.regenerations.clone();
        thread::spawn(move || {
            paravisor(
                &tcti,
                &vcek,
                &options,
                &ready_tx,
                &trigger_rx,
                &regenerations,
            )
        });
        match ready_rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Ok(())) => Ok(cvm),
            Ok(Err(e)) => Err(format!("provisioning the vTPM: {e}\n{}", cvm.log())),
            Err(_) => Err("the paravisor did not come up".into()),
        }
    }
}

impl Drop for AzureCvm {
    fn drop(&mut self) {
        let _ = self.swtpm.kill();
        let _ = self.swtpm.wait();
    }
}

/// Two listeners on consecutive loopback ports (the swtpm TCTI puts control on port + 1).
fn consecutive_listeners() -> Result<(TcpListener, TcpListener), String> {
    for _ in 0..50 {
        let a = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let port = a.local_addr().map_err(|e| e.to_string())?.port();
        if port == u16::MAX {
            continue;
        }
        if let Ok(b) = TcpListener::bind(("127.0.0.1", port + 1)) {
            return Ok((a, b));
        }
    }
    Err("no two consecutive free loopback ports".into())
}

/// Reads one TPM command or response: a 10-byte header whose bytes 2..6 are the size.
fn read_frame(stream: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let mut frame = vec![0u8; 10];
    stream.read_exact(&mut frame)?;
    let size = u32::from_be_bytes([frame[2], frame[3], frame[4], frame[5]]) as usize;
    if !(10..=MAX_FRAME).contains(&size) {
        return Err(std::io::Error::other(format!("TPM frame of {size} bytes")));
    }
    frame.resize(size, 0);
    stream.read_exact(&mut frame[10..])?;
    Ok(frame)
}

fn serve_mux(listener: TcpListener, upstream: UnixStream, trigger: mpsc::Sender<()>) {
    let upstream = Arc::new(Mutex::new(upstream));
    thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let upstream = upstream.clone();
            let trigger = trigger.clone();
            thread::spawn(move || forward(client, &upstream, &trigger));
        }
    });
}

fn forward(mut client: TcpStream, upstream: &Mutex<UnixStream>, trigger: &mpsc::Sender<()>) {
    while let Ok(command) = read_frame(&mut client) {
        let response = {
            let Ok(mut up) = upstream.lock() else { return };
            if up.write_all(&command).is_err() {
                return;
            }
            match read_frame(&mut *up) {
                Ok(r) => r,
                Err(_) => return,
            }
        };
        let code = u32::from_be_bytes([command[6], command[7], command[8], command[9]]);
        let rc = u32::from_be_bytes([response[6], response[7], response[8], response[9]]);
        // NV_Write: header, then authHandle (4 bytes) and nvIndex (4 bytes).
        let index = command
            .get(14..18)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
        if client.write_all(&response).is_err() {
            return;
        }
        if code == CC_NV_WRITE && rc == 0 && index == Some(azure::USER_DATA_INDEX) {
            let _ = trigger.send(());
        }
    }
}

fn serve_ctrl(listener: TcpListener, ctrl_sock: PathBuf) {
    thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(up) = UnixStream::connect(&ctrl_sock) else {
                continue;
            };
            let (Ok(mut c2), Ok(mut u2)) = (client.try_clone(), up.try_clone()) else {
                continue;
            };
            let (mut c1, mut u1) = (client, up);
            thread::spawn(move || {
                let _ = std::io::copy(&mut c1, &mut u1);
                let _ = u1.shutdown(std::net::Shutdown::Both);
            });
            thread::spawn(move || {
                let _ = std::io::copy(&mut u2, &mut c2);
                let _ = c2.shutdown(std::net::Shutdown::Both);
            });
        }
    });
}

/// Serves THIM's answer for `vcek` on a loopback port; returns the port.
fn serve_thim(
    amd: &SimulatedAmd,
    vcek: &SimulatedKey,
    fields: &ReportFields,
) -> Result<u16, String> {
    use axum::http::{HeaderMap, StatusCode};
    let product = fields.product;
    let tcbm = format!("{:016X}", u64::from_le_bytes(fields.tcb.encode(product)));
    let body = serde_json::json!({
        "vcekCert": attestation::sim::to_pem(vcek.cert_der()),
        "certificateChain": format!(
            "{}{}",
            attestation::sim::to_pem(amd.ask_der()),
            attestation::sim::to_pem(amd.ark_der())
        ),
        "tcbm": tcbm,
        "cacheControl": "86400",
    })
    .to_string();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                return;
            };
            let app = axum::Router::new().route(
                "/metadata/THIM/amd/certification",
                axum::routing::get(move |headers: HeaderMap| {
                    let body = body.clone();
                    async move {
                        // IMDS refuses requests without the Metadata header.
                        if headers.get("metadata").and_then(|v| v.to_str().ok()) != Some("true") {
                            return (StatusCode::BAD_REQUEST, String::new());
                        }
                        (StatusCode::OK, body)
                    }
                }),
            );
            let _ = axum::serve(listener, app).await;
        });
    });
    Ok(port)
}

fn ak_template() -> tss_esapi::Result<Public> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_restricted(true)
        .with_sign_encrypt(true)
        .build()?;
    let parameters = PublicRsaParametersBuilder::new()
        .with_scheme(RsaScheme::create(
            RsaSchemeAlgorithm::RsaSsa,
            Some(HashingAlgorithm::Sha256),
        )?)
        .with_key_bits(RsaKeyBits::Rsa2048)
        .with_exponent(RsaExponent::default())
        .with_is_signing_key(true)
        .with_restricted(true)
        .build()?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Rsa)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_rsa_parameters(parameters)
        .with_rsa_unique_identifier(PublicKeyRsa::default())
        .build()
}

fn pcr_handle(i: u8) -> Result<tss_esapi::handles::PcrHandle, String> {
    use tss_esapi::handles::PcrHandle as P;
    const ALL: [P; 24] = [
        P::Pcr0,
        P::Pcr1,
        P::Pcr2,
        P::Pcr3,
        P::Pcr4,
        P::Pcr5,
        P::Pcr6,
        P::Pcr7,
        P::Pcr8,
        P::Pcr9,
        P::Pcr10,
        P::Pcr11,
        P::Pcr12,
        P::Pcr13,
        P::Pcr14,
        P::Pcr15,
        P::Pcr16,
        P::Pcr17,
        P::Pcr18,
        P::Pcr19,
        P::Pcr20,
        P::Pcr21,
        P::Pcr22,
        P::Pcr23,
    ];
    ALL.get(usize::from(i))
        .copied()
        .ok_or_else(|| format!("PCR {i}"))
}

/// SHA-256 of a label: the digest the emulated firmware extends a PCR with.
pub fn measurement(label: &str) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, label.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// An RSA public key: modulus and exponent, big-endian.
type RsaPublic = (Vec<u8>, Vec<u8>);

/// The HCL report the paravisor writes for `user_data`.
fn hcl_for(
    vcek: &SimulatedKey,
    options: &Options,
    ak: &RsaPublic,
    user_data: &[u8],
) -> Result<Vec<u8>, String> {
    let var_data = attestation::sim::azure_var_data(&ak.0, &ak.1, user_data, &options.vm);
    let mut fields = options.fields.clone();
    fields.report_data = attestation::sim::azure_report_data(&var_data);
    let report = vcek.sign_report(&fields).map_err(|e| e.to_string())?;
    let mut var_data = var_data;
    if options.faults.tamper_var_data {
        // Turn secure boot off after the report was signed over the variable data.
        let text = String::from_utf8_lossy(&var_data)
            .replace("\"secure-boot\":true", "\"secure-boot\":false");
        var_data = text.into_bytes();
    }
    let mut hcl = attestation::sim::build_hcl(&report, &var_data);
    if hcl.len() > HCL_INDEX_SIZE {
        return Err(format!(
            "HCL report of {} bytes does not fit the NV index",
            hcl.len()
        ));
    }
    hcl.resize(HCL_INDEX_SIZE, 0);
    Ok(hcl)
}

fn paravisor(
    tcti: &str,
    vcek: &SimulatedKey,
    options: &Options,
    ready: &mpsc::Sender<Result<(), String>>,
    trigger: &mpsc::Receiver<()>,
    regenerations: &Mutex<u64>,
) {
    let provisioned = (|| -> Result<(tss_esapi::Context, RsaPublic), String> {
        let mut ctx = azure::open(tcti).map_err(|e| e.to_string())?;
        let tpm = |e: tss_esapi::Error| e.to_string();
        // Firmware measurements: PCRs 0-7 like a boot, then the test's own.
        let mut extend: Vec<(u8, [u8; 32])> = (0..8)
            .map(|i| (i, measurement(&format!("emulated firmware stage {i}"))))
            .collect();
        extend.extend(options.extend.iter().copied());
        for (pcr, digest) in extend {
            let mut values = DigestValues::new();
            values.set(
                HashingAlgorithm::Sha256,
                Digest::try_from(digest.to_vec()).map_err(tpm)?,
            );
            ctx.pcr_extend(pcr_handle(pcr)?, values).map_err(tpm)?;
        }
        let key = ctx
            .create_primary(
                Hierarchy::Owner,
                ak_template().map_err(tpm)?,
                None,
                None,
                None,
                None,
            )
            .map_err(tpm)?;
        let persistent = PersistentTpmHandle::new(azure::AK_HANDLE).map_err(tpm)?;
        ctx.evict_control(
            Provision::Owner,
            key.key_handle.into(),
            Persistent::Persistent(persistent),
        )
        .map_err(tpm)?;
        let Public::Rsa { unique, .. } = &key.out_public else {
            return Err("the attestation key is not RSA".into());
        };
        let mut ak = (unique.value().to_vec(), vec![0x01, 0x00, 0x01]);
        if options.faults.foreign_attestation_key {
            let other = attestation::sim::SimulatedVtpm::generate().map_err(|e| e.to_string())?;
            ak = other.ak_public();
        }
        let hcl = hcl_for(vcek, options, &ak, &[0u8; 64])?;
        azure::nv_write_all(&mut ctx, azure::HCL_REPORT_INDEX, &hcl).map_err(|e| e.to_string())?;
        Ok((ctx, ak))
    })();
    let (mut ctx, ak) = match provisioned {
        Ok(p) => {
            let _ = ready.send(Ok(()));
            p
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    while trigger.recv().is_ok() {
        let regenerated = azure::nv_read_all(&mut ctx, azure::USER_DATA_INDEX)
            .map_err(|e| e.to_string())
            .and_then(|user_data| hcl_for(vcek, options, &ak, &user_data))
            .and_then(|hcl| {
                azure::nv_write_all(&mut ctx, azure::HCL_REPORT_INDEX, &hcl)
                    .map_err(|e| e.to_string())
            });
        match regenerated {
            Ok(()) => {
                if let Ok(mut n) = regenerations.lock() {
                    *n += 1;
                }
            }
            Err(e) => eprintln!("emulated paravisor: {e}"),
        }
    }
}

/// Whether swtpm is installed (the tests need it; `make deps` installs it).
pub fn swtpm_available() -> bool {
    Command::new("swtpm")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
