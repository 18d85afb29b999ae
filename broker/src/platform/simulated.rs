//! The simulated platform (feature `simulator`): what `[platform] dangerous_simulated` runs
//! the `snp-sealed` provider and the broker's own evidence on, in tests and demos.

use std::path::Path;

use zeroize::Zeroizing;

use super::{Platform, SealField, Sealing, b64, entry_of};
use crate::Error;

/// The simulated platform (tests and demos only): a "chip secret" derived from the simulated
/// AMD hierarchy's ASK key and the chip id, mixed with the simulated VM's launch fields the
/// way the firmware mixes the real ones, and refusing what the firmware refuses (a VMPL below
/// the VM's, an SVN or TCB above its own).
pub struct Simulated {
    secret: Zeroizing<Vec<u8>>,
    fields: attestation::sim::ReportFields,
    vcek: attestation::sim::SimulatedKey,
    ask: Vec<u8>,
}

impl std::fmt::Debug for Simulated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Simulated").finish_non_exhaustive()
    }
}

impl Simulated {
    /// The simulated VM `fields` on the chip of the simulated hierarchy in `dir` (`sim/` of
    /// `broker init --dev`).
    pub fn load(dir: &Path, fields: attestation::sim::ReportFields) -> Result<Simulated, Error> {
        let der = |name: &str| -> Result<Vec<u8>, Error> {
            let path = dir.join(name);
            let pem = std::fs::read(&path).map_err(|source| Error::Read {
                path: path.clone(),
                source,
            })?;
            attestation::certs::decode_pem_or_der(&pem, name)?
                .into_iter()
                .next()
                .ok_or_else(|| Error::Config(format!("{}: empty", path.display())))
        };
        let keys = [der("ark.key")?, der("ask.key")?, der("asvk.key")?];
        let certs = [der("ark.pem")?, der("ask.pem")?, der("asvk.pem")?];
        let amd = attestation::sim::SimulatedAmd::load(
            fields.product,
            [&keys[0], &keys[1], &keys[2]],
            [&certs[0], &certs[1], &certs[2]],
        )
        .map_err(|e| Error::Config(format!("simulated platform: {e}")))?;
        let vcek = amd
            .issue_vcek(
                &fields.chip_id,
                fields.tcb,
                std::time::SystemTime::now() - std::time::Duration::from_secs(3600),
            )
            .map_err(|e| Error::Config(format!("simulated platform: {e}")))?;
        let der = &keys[1];
        let salt = aws_lc_rs::hkdf::Salt::new(
            aws_lc_rs::hkdf::HKDF_SHA256,
            b"snp-key-broker simulated chip secret",
        );
        let prk = salt.extract(der);
        let info = [&fields.chip_id[..]];
        let okm = prk
            .expand(&info, aws_lc_rs::hkdf::HKDF_SHA256)
            .map_err(|_| Error::Crypto("HKDF expand".into()))?;
        let mut secret = Zeroizing::new(vec![0u8; 32]);
        okm.fill(&mut secret)
            .map_err(|_| Error::Crypto("HKDF fill".into()))?;
        Ok(Simulated {
            secret,
            ask: amd.ask_der().to_vec(),
            fields,
            vcek,
        })
    }
}

impl Platform for Simulated {
    fn name(&self) -> &'static str {
        "simulated"
    }

    fn derived_key(&self, sealing: &Sealing) -> Result<Zeroizing<[u8; 32]>, Error> {
        let f = &self.fields;
        if sealing.vmpl < f.vmpl {
            return Err(Error::Crypto(format!(
                "snp-sealed: MSG_KEY_REQ refused: VMPL {} is below the VM's {}",
                sealing.vmpl, f.vmpl
            )));
        }
        if sealing.guest_svn > f.guest_svn {
            return Err(Error::Crypto(format!(
                "snp-sealed: MSG_KEY_REQ refused: guest SVN {} is above the VM's {}",
                sealing.guest_svn, f.guest_svn
            )));
        }
        let mut mix = Vec::new();
        mix.extend_from_slice(&sealing.field_select().to_le_bytes());
        mix.extend_from_slice(&sealing.vmpl.to_le_bytes());
        for field in &sealing.fields {
            match field {
                SealField::Policy => mix.extend_from_slice(&f.policy.to_le_bytes()),
                SealField::ImageId => mix.extend_from_slice(&f.image_id),
                SealField::FamilyId => mix.extend_from_slice(&f.family_id),
                SealField::Measurement => mix.extend_from_slice(&f.measurement),
                SealField::GuestSvn => mix.extend_from_slice(&sealing.guest_svn.to_le_bytes()),
                SealField::TcbVersion => mix.extend_from_slice(&sealing.tcb_version.to_le_bytes()),
            }
        }
        let salt = aws_lc_rs::hkdf::Salt::new(
            aws_lc_rs::hkdf::HKDF_SHA256,
            b"snp-key-broker simulated MSG_KEY_REQ",
        );
        let prk = salt.extract(&self.secret);
        let info = [&mix[..]];
        let okm = prk
            .expand(&info, aws_lc_rs::hkdf::HKDF_SHA256)
            .map_err(|_| Error::Crypto("HKDF expand".into()))?;
        let mut key = Zeroizing::new([0u8; 32]);
        okm.fill(&mut key[..])
            .map_err(|_| Error::Crypto("HKDF fill".into()))?;
        Ok(key)
    }

    fn report(&self, report_data: [u8; 64]) -> Result<attestation::protocol::Evidence, Error> {
        let mut fields = self.fields.clone();
        fields.report_data = report_data;
        let report = self
            .vcek
            .sign_report(&fields)
            .map_err(|e| Error::Crypto(format!("simulated report: {e}")))?;
        Ok(attestation::protocol::Evidence::Snp {
            report: b64(&report),
            certificates: vec![
                entry_of("vcek", self.vcek.cert_der()),
                entry_of("ask", &self.ask),
            ],
        })
    }
}
