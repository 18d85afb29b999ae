//! The simulated platform: its reports verify only when its root is trusted by name, and
//! every check of the verifier refuses the matching broken twin.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use attestation::cert_table::{self, CertEntry, CertKind};
use attestation::certs::decode_pem_or_der;
use attestation::sim::{ReportFields, SimulatedAmd, SimulatedKey};
use attestation::{
    CertRole, Endorsements, Error, Product, RootKind, SigningKeyKind, TcbComponent, TrustAnchors,
    Verifier, binding,
};

const DAY: Duration = Duration::from_secs(24 * 3600);

fn now() -> SystemTime {
    SystemTime::now()
}

fn hierarchy(product: Product) -> &'static SimulatedAmd {
    static MILAN: OnceLock<SimulatedAmd> = OnceLock::new();
    static GENOA: OnceLock<SimulatedAmd> = OnceLock::new();
    static TURIN: OnceLock<SimulatedAmd> = OnceLock::new();
    let cell = match product {
        Product::Milan => &MILAN,
        Product::Genoa => &GENOA,
        Product::Turin => &TURIN,
    };
    cell.get_or_init(|| SimulatedAmd::generate(product, now()).unwrap())
}

fn sim_verifier(product: Product) -> Verifier {
    let anchors = TrustAnchors::amd()
        .unwrap()
        .dangerous_trust_simulated_root(hierarchy(product).ark_der())
        .unwrap()
        .with_intermediate(hierarchy(product).ask_der())
        .with_intermediate(hierarchy(product).asvk_der());
    Verifier::new(anchors)
}

fn vcek(product: Product, fields: &ReportFields) -> SimulatedKey {
    hierarchy(product)
        .issue_vcek(&fields.chip_id, fields.tcb, now() - DAY)
        .unwrap()
}

fn endorse(key: &SimulatedKey) -> Endorsements {
    Endorsements {
        vek: key.cert_der().to_vec(),
        ..Default::default()
    }
}

#[test]
fn simulated_reports_verify_only_against_the_simulated_root() {
    for (product, version) in [
        (Product::Turin, 5),
        (Product::Genoa, 3),
        (Product::Milan, 2),
    ] {
        let fields = ReportFields::new(product);
        assert_eq!(fields.version, version);
        let key = vcek(product, &fields);
        let report = key.sign_report(&fields).unwrap();

        let verified = sim_verifier(product)
            .verify(&report, &endorse(&key), now())
            .unwrap_or_else(|e| panic!("{product}: {e}"));
        let claims = verified.claims();
        assert_eq!(claims.product, product);
        assert_eq!(claims.report_version, version);
        assert_eq!(claims.root, RootKind::Simulated);
        assert_eq!(
            claims.tcb.reported.fmc,
            (product == Product::Turin).then_some(1)
        );

        // AMD's anchors: without the simulated ASK there is no chain at all…
        let amd = Verifier::new(TrustAnchors::amd().unwrap());
        assert_eq!(
            amd.verify(&report, &endorse(&key), now()).unwrap_err(),
            Error::MissingCertificate {
                role: CertRole::Ask
            }
        );
        // …with it, the simulated ASK has no AMD issuer…
        let mut e = endorse(&key);
        e.chain = vec![hierarchy(product).ask_der().to_vec()];
        assert_eq!(
            amd.verify(&report, &e, now()).unwrap_err(),
            Error::UnknownIssuer {
                role: CertRole::Ask,
                issuer: attestation_issuer(product)
            }
        );
        // …and supplying the simulated ARK does not make it trusted.
        let mut e = endorse(&key);
        e.chain = decode_pem_or_der(
            hierarchy(product)
                .cert_chain_pem(SigningKeyKind::Vcek)
                .as_bytes(),
            "chain",
        )
        .unwrap();
        assert!(matches!(
            amd.verify(&report, &e, now()),
            Err(Error::UntrustedRoot { .. })
        ));
    }
}

fn attestation_issuer(product: Product) -> String {
    // Name::to_string prints RFC 4514 order.
    format!(
        "CN=ARK-{},O=Simulated SEV-SNP platform (not AMD),OU=SIMULATED,C=US",
        product.name()
    )
}

#[test]
fn simulated_vlek_with_masked_chip_id_verifies() {
    let product = Product::Genoa;
    let mut fields = ReportFields::new(product);
    fields.chip_id = [0; 64];
    fields.vmpl = 1;
    let key = hierarchy(product)
        .issue_vlek(fields.tcb, "CN=simulated-cloud.example", now() - DAY)
        .unwrap();
    let report = key.sign_report(&fields).unwrap();
    let claims = sim_verifier(product)
        .verify(&report, &endorse(&key), now())
        .unwrap()
        .claims();
    assert_eq!(claims.signing_key, SigningKeyKind::Vlek);
    assert_eq!(claims.csp_id.as_deref(), Some("CN=simulated-cloud.example"));

    // The VLEK expires after a year.
    let later = now() + 400 * DAY;
    assert!(matches!(
        sim_verifier(product).verify(&report, &endorse(&key), later),
        Err(Error::CertificateNotValidAt {
            role: CertRole::Vlek,
            ..
        })
    ));
}

#[test]
fn masked_chip_id_needs_a_vlek() {
    let product = Product::Milan;
    let mut fields = ReportFields::new(product);
    let key = vcek(product, &fields);
    fields.chip_id = [0; 64];
    let report = key.sign_report(&fields).unwrap();
    assert_eq!(
        sim_verifier(product)
            .verify(&report, &endorse(&key), now())
            .unwrap_err(),
        Error::MaskedChipId
    );
}

#[test]
fn key_selection_field_must_match_the_certificate_kind() {
    let product = Product::Milan;
    let fields = ReportFields::new(product);
    let vlek = hierarchy(product)
        .issue_vlek(fields.tcb, "CN=x", now() - DAY)
        .unwrap();
    // A report that says "VCEK" but is endorsed by a VLEK.
    let mut raw: [u8; 0x4A0] = fields.encode(SigningKeyKind::Vcek);
    vlek.sign_raw(&mut raw).unwrap();
    assert_eq!(
        sim_verifier(product)
            .verify(&raw, &endorse(&vlek), now())
            .unwrap_err(),
        Error::SigningKeyMismatch {
            report: SigningKeyKind::Vcek,
            certificate: SigningKeyKind::Vlek
        }
    );
}

#[test]
fn cpuid_product_must_match_the_chain() {
    let mut fields = ReportFields::new(Product::Genoa);
    // A Genoa-shaped report endorsed by a Milan VCEK.
    let key = vcek(Product::Milan, &fields);
    fields.product = Product::Genoa;
    let report = key.sign_report(&fields).unwrap();
    assert_eq!(
        sim_verifier(Product::Milan)
            .verify(&report, &endorse(&key), now())
            .unwrap_err(),
        Error::ProductMismatch {
            report: Product::Genoa,
            certificate: Product::Milan
        }
    );
}

#[test]
fn every_tcb_component_is_compared_with_the_certificate() {
    let product = Product::Turin;
    let fields = ReportFields::new(product);
    let key = vcek(product, &fields);
    let v = sim_verifier(product);
    for component in [
        TcbComponent::Fmc,
        TcbComponent::Bootloader,
        TcbComponent::Tee,
        TcbComponent::Snp,
        TcbComponent::Microcode,
    ] {
        let mut f = fields.clone();
        let (reported, certified) = match component {
            TcbComponent::Fmc => (f.tcb.fmc.insert(2), 1),
            TcbComponent::Bootloader => (&mut f.tcb.bootloader, 9),
            TcbComponent::Tee => (&mut f.tcb.tee, 0),
            TcbComponent::Snp => (&mut f.tcb.snp, 23),
            TcbComponent::Microcode => (&mut f.tcb.microcode, 72),
        };
        *reported = certified as u8 + 1;
        let expected = Error::TcbMismatch {
            component,
            reported: certified as u8 + 1,
            certified,
        };
        let report = key.sign_report(&f).unwrap();
        assert_eq!(
            v.verify(&report, &endorse(&key), now()).unwrap_err(),
            expected
        );
    }
}

#[test]
fn hwid_must_equal_chip_id() {
    let product = Product::Genoa;
    let mut fields = ReportFields::new(product);
    let key = vcek(product, &fields);
    fields.chip_id[63] ^= 1;
    let report = key.sign_report(&fields).unwrap();
    assert_eq!(
        sim_verifier(product)
            .verify(&report, &endorse(&key), now())
            .unwrap_err(),
        Error::HwIdMismatch
    );
}

#[test]
fn crl_signed_by_the_ark_revokes_each_level() {
    let product = Product::Milan;
    let h = hierarchy(product);
    let fields = ReportFields::new(product);
    let key = vcek(product, &fields);
    let vlek = h.issue_vlek(fields.tcb, "CN=x", now() - DAY).unwrap();
    let mut vlek_fields = fields.clone();
    vlek_fields.chip_id = [0; 64];
    let v = sim_verifier(product);

    let serial = |der: &[u8]| {
        use der::Decode;
        let cert = x509_cert::Certificate::from_der(der).unwrap();
        cert.tbs_certificate().serial_number().as_bytes().to_vec()
    };
    let crl = |serials: Vec<Vec<u8>>| h.crl(&serials, now() - DAY, now() + 7 * DAY).unwrap();

    // An empty CRL changes nothing.
    let report = key.sign_report(&fields).unwrap();
    let mut e = endorse(&key);
    e.crls = vec![crl(vec![])];
    v.verify(&report, &e, now()).unwrap();

    let cases = [
        (&key, &fields, serial(h.ask_der()), CertRole::Ask),
        (&key, &fields, serial(key.cert_der()), CertRole::Vcek),
        (&vlek, &vlek_fields, serial(h.asvk_der()), CertRole::Asvk),
        (&vlek, &vlek_fields, serial(vlek.cert_der()), CertRole::Vlek),
    ];
    for (signer, f, revoked_serial, role) in cases {
        let report = signer.sign_report(f).unwrap();
        let mut e = endorse(signer);
        e.crls = vec![crl(vec![revoked_serial.clone()])];
        assert_eq!(
            v.verify(&report, &e, now()).unwrap_err(),
            Error::Revoked {
                role,
                serial: hex::encode(&revoked_serial)
            }
        );
    }

    // A CRL that is out of date, or not signed by this ARK, is refused.
    let mut e = endorse(&key);
    e.crls = vec![h.crl(&[], now() - 10 * DAY, now() - DAY).unwrap()];
    assert!(matches!(
        v.verify(&report, &e, now()),
        Err(Error::Crl { .. })
    ));
    let impostor = SimulatedAmd::generate(product, now()).unwrap();
    e.crls = vec![impostor.crl(&[], now() - DAY, now() + DAY).unwrap()];
    assert!(matches!(
        v.verify(&report, &e, now()),
        Err(Error::Crl { .. })
    ));
    e.crls = vec![b"not a crl".to_vec()];
    assert!(matches!(
        v.verify(&report, &e, now()),
        Err(Error::Crl { .. })
    ));
}

#[test]
fn chains_built_from_the_published_fake_amd_keys_are_refused() {
    // go-sev-guest's fake AMD hierarchy, with AMD's exact names: only pinning refuses it.
    let key = |name: &str| {
        let pem = std::fs::read(format!(
            "{}/tests/data/invalid/go-sev-guest-fake-amd-keys/{name}_private_key.pem",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        decode_pem_or_der(&pem, name).unwrap().remove(0)
    };
    let fake = SimulatedAmd::impersonating_amd(
        Product::Milan,
        &key("ark"),
        &key("ask"),
        &key("asvk"),
        now(),
    )
    .unwrap();
    let fields = ReportFields::new(Product::Milan);
    let vcek = fake
        .issue_vcek_with_key(&key("vcek"), &fields.chip_id, fields.tcb, now() - DAY)
        .unwrap();
    let report = vcek.sign_report(&fields).unwrap();
    let amd = Verifier::new(TrustAnchors::amd().unwrap());

    // With the fake ARK supplied: not the pinned root.
    let mut e = endorse(&vcek);
    e.chain = decode_pem_or_der(fake.cert_chain_pem(SigningKeyKind::Vcek).as_bytes(), "c").unwrap();
    assert!(matches!(
        amd.verify(&report, &e, now()),
        Err(Error::UntrustedRoot { .. })
    ));

    // Without it: the fake ASK names AMD's ARK as issuer, but AMD's key did not sign it.
    e.chain.truncate(1);
    assert_eq!(
        amd.verify(&report, &e, now()).unwrap_err(),
        Error::ChainSignature {
            role: CertRole::Ask,
            issuer: CertRole::Ark
        }
    );
}

#[test]
fn a_chain_verified_under_other_anchors_is_foreign() {
    let product = Product::Milan;
    let fields = ReportFields::new(product);
    let key = vcek(product, &fields);
    let report = key.sign_report(&fields).unwrap();
    let chain = sim_verifier(product)
        .verify_chain(&endorse(&key), now())
        .unwrap();
    let amd = Verifier::new(TrustAnchors::amd().unwrap());
    assert_eq!(
        amd.verify_report(&report, &chain, now()).unwrap_err(),
        Error::ForeignChain
    );
}

#[test]
fn binding_of_nonce_and_key() {
    let product = Product::Genoa;
    let mut fields = ReportFields::new(product);
    fields.report_data = binding::report_data(b"nonce-1", b"ephemeral-public-key");
    let key = vcek(product, &fields);
    let report = key.sign_report(&fields).unwrap();
    let verified = sim_verifier(product)
        .verify(&report, &endorse(&key), now())
        .unwrap();
    verified
        .check_binding(b"nonce-1", b"ephemeral-public-key")
        .unwrap();
    assert_eq!(
        verified.check_binding(b"nonce-2", b"ephemeral-public-key"),
        Err(Error::BindingMismatch)
    );
    assert_eq!(
        verified.check_binding(b"nonce-1", b"another-key"),
        Err(Error::BindingMismatch)
    );
}

#[test]
fn certificate_table_from_an_extended_report() {
    let product = Product::Turin;
    let fields = ReportFields::new(product);
    let key = vcek(product, &fields);
    let h = hierarchy(product);
    let table = cert_table::build(&[
        CertEntry {
            kind: CertKind::Vcek,
            der: key.cert_der().to_vec(),
        },
        CertEntry {
            kind: CertKind::Ask,
            der: h.ask_der().to_vec(),
        },
        CertEntry {
            kind: CertKind::Ark,
            der: h.ark_der().to_vec(),
        },
    ]);
    let e = Endorsements::from_cert_table(&table).unwrap();
    let report = key.sign_report(&fields).unwrap();
    sim_verifier(product).verify(&report, &e, now()).unwrap();
}

#[test]
fn keys_survive_export_and_reload() {
    let product = Product::Milan;
    let fields = ReportFields::new(product);
    let key = vcek(product, &fields);
    let reloaded = SimulatedKey::from_parts(
        SigningKeyKind::Vcek,
        &key.private_key_pkcs8().unwrap(),
        key.cert_der().to_vec(),
    )
    .unwrap();
    let report = reloaded.sign_report(&fields).unwrap();
    sim_verifier(product)
        .verify(&report, &endorse(&key), now())
        .unwrap();
    assert_eq!(hierarchy(product).private_keys_pkcs8().unwrap().len(), 3);
}

mod broken_twins {
    //! Each certificate check of the verifier, against a simulated VCEK with that one defect.
    use super::*;
    use attestation::certs::{CANONICAL_PSS_PARAMS, oid};
    use attestation::sim::VcekTweak;

    fn verify_with(tweak: VcekTweak) -> Result<attestation::VerifiedReport, Error> {
        let product = Product::Genoa;
        let fields = ReportFields::new(product);
        let key = hierarchy(product)
            .issue_vcek_tweaked(&fields.chip_id, fields.tcb, now() - DAY, &tweak)
            .unwrap();
        let report = key.sign_report(&fields).unwrap();
        sim_verifier(product).verify(&report, &endorse(&key), now())
    }

    #[test]
    fn canonical_pss_parameters_are_accepted() {
        verify_with(VcekTweak {
            signature_params: Some(CANONICAL_PSS_PARAMS.to_vec()),
            ..Default::default()
        })
        .unwrap();
    }

    #[test]
    fn other_signature_parameters_are_refused() {
        // PSS with SHA-256 and a 32-byte salt.
        let sha256_params = hex::decode(
            "3034a00f300d06096086480165030402010500a11c301a06092a864886f70d010108300d06096086480165030402010500a203020120",
        )
        .unwrap();
        assert_eq!(
            verify_with(VcekTweak {
                signature_params: Some(sha256_params),
                ..Default::default()
            })
            .unwrap_err(),
            Error::UnexpectedSignatureAlgorithm {
                role: CertRole::Vcek
            }
        );
    }

    #[test]
    fn missing_extensions_are_refused() {
        for (missing, role) in [
            (oid::HWID, CertRole::Vcek),
            (oid::SNP_SPL, CertRole::Vcek),
            (oid::UCODE_SPL, CertRole::Vcek),
            (oid::PRODUCT_NAME, CertRole::Vcek),
        ] {
            assert_eq!(
                verify_with(VcekTweak {
                    omit: vec![missing],
                    ..Default::default()
                })
                .unwrap_err(),
                Error::MissingExtension { role, oid: missing },
                "{missing}"
            );
        }
    }

    #[test]
    fn malformed_extensions_are_refused() {
        assert_eq!(
            verify_with(VcekTweak {
                replace: vec![(oid::SNP_SPL, vec![0x04, 0x01, 0x17])],
                ..Default::default()
            })
            .unwrap_err(),
            Error::MalformedExtension {
                role: CertRole::Vcek,
                oid: oid::SNP_SPL.to_string()
            }
        );
    }

    #[test]
    fn a_product_name_of_another_generation_is_refused() {
        let milan =
            der::Encode::to_der(&der::asn1::Ia5StringRef::new("Milan-B0").unwrap()).unwrap();
        assert!(matches!(
            verify_with(VcekTweak {
                replace: vec![(oid::PRODUCT_NAME, milan)],
                ..Default::default()
            }),
            Err(Error::CertificateMalformed {
                role: CertRole::Vcek,
                ..
            })
        ));
    }

    #[test]
    fn a_p256_key_is_refused() {
        assert_eq!(
            verify_with(VcekTweak {
                p256_key: true,
                ..Default::default()
            })
            .unwrap_err(),
            Error::UnexpectedKeyType {
                role: CertRole::Vcek
            }
        );
    }
}

#[test]
fn an_expired_root_is_refused() {
    // A hierarchy made 30 years ago: its 25-year ARK has expired.
    let product = Product::Milan;
    let old = SimulatedAmd::generate(product, now() - 30 * 365 * DAY).unwrap();
    let fields = ReportFields::new(product);
    let key = old
        .issue_vcek(&fields.chip_id, fields.tcb, now() - DAY)
        .unwrap();
    let v = Verifier::new(
        TrustAnchors::empty()
            .dangerous_trust_simulated_root(old.ark_der())
            .unwrap()
            .with_intermediate(old.ask_der()),
    );
    let report = key.sign_report(&fields).unwrap();
    assert!(matches!(
        v.verify(&report, &endorse(&key), now()),
        Err(Error::CertificateNotValidAt {
            role: CertRole::Ark,
            ..
        })
    ));
}

#[test]
fn a_version_2_report_cannot_come_from_turin() {
    let product = Product::Turin;
    let mut fields = ReportFields::new(product);
    fields.version = 2;
    // Keep Turin's TCB bytes clear of Milan's reserved ones, so the parser lets it through.
    fields.tcb.snp = 0;
    let key = vcek(product, &fields);
    let report = key.sign_report(&fields).unwrap();
    assert_eq!(
        sim_verifier(product)
            .verify(&report, &endorse(&key), now())
            .unwrap_err(),
        Error::UnsupportedVersion { version: 2 }
    );
}

#[test]
fn a_crl_checked_against_a_cached_chain() {
    let product = Product::Genoa;
    let h = hierarchy(product);
    let fields = ReportFields::new(product);
    let key = vcek(product, &fields);
    let report = key.sign_report(&fields).unwrap();
    let v = sim_verifier(product);
    let chain = v.verify_chain(&endorse(&key), now()).unwrap();
    assert!(!chain.crl_checked());

    let fresh = h.crl(&[], now() - DAY, now() + DAY).unwrap();
    let checked = v.check_revocation(&chain, &fresh, now()).unwrap();
    assert!(checked.crl_checked());
    v.verify_report(&report, &checked, now()).unwrap();
    // Once the CRL's nextUpdate has passed, the cached chain is no longer good.
    assert!(matches!(
        v.verify_report(&report, &checked, now() + 2 * DAY),
        Err(Error::Crl { .. })
    ));

    use der::Decode;
    let ask_serial = x509_cert::Certificate::from_der(h.ask_der())
        .unwrap()
        .tbs_certificate()
        .serial_number()
        .as_bytes()
        .to_vec();
    let revoking = h.crl(&[ask_serial], now() - DAY, now() + DAY).unwrap();
    assert!(matches!(
        v.check_revocation(&chain, &revoking, now()),
        Err(Error::Revoked {
            role: CertRole::Ask,
            ..
        })
    ));
}

mod azure_vtpm {
    use super::*;
    use attestation::HclReport;
    use attestation::sim::SimulatedVtpm;

    struct Case {
        verifier: Verifier,
        key: SimulatedKey,
        vtpm: SimulatedVtpm,
        fields: ReportFields,
        binding: [u8; 64],
    }

    fn case() -> Case {
        let fields = ReportFields::new(Product::Genoa);
        Case {
            verifier: sim_verifier(Product::Genoa),
            key: vcek(Product::Genoa, &fields),
            vtpm: SimulatedVtpm::generate().unwrap(),
            fields,
            binding: binding::report_data(b"nonce", b"key"),
        }
    }

    impl Case {
        fn verify(
            &self,
            hcl: &[u8],
            quote: &attestation::tpm::Quote,
        ) -> Result<attestation::VerifiedReport, Error> {
            let chain = self
                .verifier
                .verify_chain(&endorse(&self.key), now())
                .unwrap();
            let hcl = HclReport::parse(hcl)?;
            self.verifier.verify_az_snp_vtpm(&hcl, quote, &chain, now())
        }
        fn hcl(&self) -> Vec<u8> {
            self.vtpm
                .hcl_report(&self.key, &self.fields, &self.binding)
                .unwrap()
        }
    }

    #[test]
    fn good_evidence_binds_and_exposes_pcrs() {
        let c = case();
        let mut hcl = c.hcl();
        // NV indices are read whole: trailing padding is tolerated.
        hcl.resize(2048, 0);
        let v = c.verify(&hcl, &c.vtpm.quote(&c.binding).unwrap()).unwrap();
        v.check_binding(b"nonce", b"key").unwrap();
        let claims = v.claims().to_json();
        assert_eq!(claims["tpm"]["pcr"]["7"], hex::encode(c.vtpm.pcrs[7]));
        assert_eq!(claims["azure"]["secure_boot"], true);
        // Every Azure and TPM claim a policy may name is present.
        for (name, _) in attestation::policy::CLAIMS {
            if name.starts_with("azure.") || name.starts_with("tpm.") {
                let pointer = format!("/{}", name.replace('.', "/"));
                assert!(claims.pointer(&pointer).is_some(), "{name}");
            }
        }
        assert_eq!(
            v.check_binding(b"nonce", b"other key"),
            Err(Error::QuoteBindingMismatch)
        );
    }

    #[test]
    fn a_quote_signed_by_another_key_is_refused() {
        let c = case();
        let other = SimulatedVtpm::generate().unwrap();
        assert_eq!(
            c.verify(&c.hcl(), &other.quote(&c.binding).unwrap())
                .unwrap_err(),
            Error::QuoteSignature
        );
    }

    #[test]
    fn pcr_values_must_match_the_quote() {
        let c = case();
        let mut q = c.vtpm.quote(&c.binding).unwrap();
        q.pcrs[4][0] ^= 0x80;
        assert_eq!(
            c.verify(&c.hcl(), &q).unwrap_err(),
            Error::PcrDigestMismatch
        );
    }

    #[test]
    fn tampered_variable_data_is_refused() {
        let c = case();
        let mut hcl = c.hcl();
        let pos = hcl.windows(4).position(|w| w == b"true").unwrap();
        hcl[pos] = b'T';
        assert_eq!(
            c.verify(&hcl, &c.vtpm.quote(&c.binding).unwrap())
                .unwrap_err(),
            Error::HclVarDataDigest
        );
    }

    #[test]
    fn quote_and_user_data_must_both_carry_the_binding() {
        let c = case();
        // A quote for this challenge, over an HCL report regenerated for another one.
        let stale = c
            .vtpm
            .hcl_report(&c.key, &c.fields, &binding::report_data(b"old", b"key"))
            .unwrap();
        let v = c
            .verify(&stale, &c.vtpm.quote(&c.binding).unwrap())
            .unwrap();
        assert_eq!(
            v.check_binding(b"nonce", b"key"),
            Err(Error::UserDataMismatch)
        );
        // And the other way round.
        let v = c
            .verify(&c.hcl(), &c.vtpm.quote(b"old quote").unwrap())
            .unwrap();
        assert_eq!(
            v.check_binding(b"nonce", b"key"),
            Err(Error::QuoteBindingMismatch)
        );
    }

    #[test]
    fn an_hcl_report_alone_cannot_be_bound() {
        let c = case();
        let chain = c.verifier.verify_chain(&endorse(&c.key), now()).unwrap();
        let hcl = HclReport::parse(&c.hcl()).unwrap();
        let v = c.verifier.verify_hcl(&hcl, &chain, now()).unwrap();
        assert_eq!(v.check_binding(b"nonce", b"key"), Err(Error::QuoteMissing));
    }
}
