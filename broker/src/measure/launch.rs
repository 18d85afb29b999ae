//! The part of a launch digest that depends on the VMM, computed here for the VMMs the `sev`
//! crate does not model correctly (EC2, whose reset state it has out of date) or at all
//! (GCE). The QEMU variant exists too, so that the tests can hold this code to the crate's
//! result on every QEMU case as well as to `sev-snp-measure` on every VMM.
//!
//! What is chained (SEV-SNP firmware ABI, SNP_LAUNCH_UPDATE and its PAGE_INFO structure):
//! starting from the firmware pages' digest, one PAGE_INFO per page of each SEV metadata
//! section, in the firmware's order, then one per vCPU's VMSA. PAGE_INFO is the current
//! digest, the page's contents digest (zeros for pages the firmware fills or does not
//! measure), its length 0x70, page type, IMI flag, VMPL permissions and its address; the new
//! digest is SHA-384 of it. The VMMs differ in three ways:
//!
//! | | QEMU | EC2 | GCE |
//! |---|---|---|---|
//! | secure-memory section | zero pages | zero pages | unmeasured pages |
//! | CPUID page | in section order | after all other sections | in section order |
//! | VMSA reset state | RDX = CPUID signature, MXCSR 0x1f80, FCW 0x37f | RDX 0x600, MXCSR and FCW 0, CS 0x9a (BSP) / 0x9b (APs), SS 0x92, TR 0x83 | RDX 0x600, MXCSR and FCW 0, G_PAT 0x70106 |
//!
//! The VMSA offsets are those of the VMCB save area in AMD's APM volume 2 (appendix B).

use attestation::ovmf::{Firmware, Section};
use aws_lc_rs::digest::{SHA384, digest};

/// A VMM whose launch state this module knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vmm {
    /// QEMU/KVM.
    Qemu,
    /// Amazon EC2.
    Ec2,
    /// Google Compute Engine.
    Gce,
}

/// PAGE_INFO page types.
#[derive(Clone, Copy)]
#[repr(u8)]
enum PageType {
    Normal = 1,
    Vmsa = 2,
    Zero = 3,
    Unmeasured = 4,
    Secrets = 5,
    Cpuid = 6,
}

/// SEV metadata section types.
const SEC_MEM: u32 = 1;
const SECRETS: u32 = 2;
const CPUID: u32 = 3;
const SVSM_CAA: u32 = 4;
const KERNEL_HASHES: u32 = 0x10;

/// The address every VMSA is measured at.
const VMSA_GPA: u64 = 0xffff_ffff_f000;
/// The bootstrap processor starts at the reset vector.
const BSP_EIP: u32 = 0xffff_fff0;
const PAGE: usize = 4096;

/// The launch digest being chained.
struct Chain([u8; 48]);

impl Chain {
    fn update(&mut self, kind: PageType, gpa: u64, contents: &[u8; 48]) {
        let mut info = [0u8; 0x70];
        info[..48].copy_from_slice(&self.0);
        info[48..96].copy_from_slice(contents);
        info[96..98].copy_from_slice(&0x70u16.to_le_bytes());
        info[98] = kind as u8;
        // 99: IMI page (no); 100..103: VMPL3..1 permissions (none); 103: reserved.
        info[104..112].copy_from_slice(&gpa.to_le_bytes());
        self.0.copy_from_slice(digest(&SHA384, &info).as_ref());
    }

    /// One PAGE_INFO per page of `section`, each with no contents.
    fn blank_pages(&mut self, kind: PageType, section: &Section) {
        for page in 0..u64::from(section.size) / PAGE as u64 {
            self.update(kind, u64::from(section.gpa) + page * PAGE as u64, &[0; 48]);
        }
    }

    fn page(&mut self, kind: PageType, gpa: u64, page: &[u8]) {
        let mut d = [0u8; 48];
        d.copy_from_slice(digest(&SHA384, page).as_ref());
        self.update(kind, gpa, &d);
    }
}

/// A VMCB segment register: selector, attributes, limit, base.
fn segment(vmsa: &mut [u8; PAGE], at: usize, selector: u16, attrib: u16, base: u64) {
    vmsa[at..at + 2].copy_from_slice(&selector.to_le_bytes());
    vmsa[at + 2..at + 4].copy_from_slice(&attrib.to_le_bytes());
    vmsa[at + 4..at + 8].copy_from_slice(&0xffffu32.to_le_bytes());
    vmsa[at + 8..at + 16].copy_from_slice(&base.to_le_bytes());
}

fn put_u64(vmsa: &mut [u8; PAGE], at: usize, value: u64) {
    vmsa[at..at + 8].copy_from_slice(&value.to_le_bytes());
}

/// The VMSA page a vCPU starting at `eip` is launched with.
fn vmsa(vmm: Vmm, eip: u32, cpu_signature: u32, features: u64) -> [u8; PAGE] {
    let bsp = eip == BSP_EIP;
    // (CS, SS, TR attributes, RDX, MXCSR, x87 FCW, G_PAT)
    const PAT: u64 = 0x0007_0406_0007_0406;
    let (cs, ss, tr, rdx, mxcsr, fcw, g_pat) = match vmm {
        Vmm::Qemu => (
            0x9b,
            0x93,
            0x8b,
            u64::from(cpu_signature),
            0x1f80,
            0x37f,
            PAT,
        ),
        Vmm::Ec2 => (if bsp { 0x9a } else { 0x9b }, 0x92, 0x83, 0x600, 0, 0, PAT),
        Vmm::Gce => (0x9b, 0x93, 0x8b, 0x600, 0, 0, 0x0007_0106),
    };
    let mut v = [0u8; PAGE];
    segment(&mut v, 0x00, 0, 0x93, 0); // ES
    segment(&mut v, 0x10, 0xf000, cs, u64::from(eip & 0xffff_0000)); // CS
    segment(&mut v, 0x20, 0, ss, 0); // SS
    for at in [0x30, 0x40, 0x50] {
        segment(&mut v, at, 0, 0x93, 0); // DS, FS, GS
    }
    segment(&mut v, 0x60, 0, 0, 0); // GDTR
    segment(&mut v, 0x70, 0, 0x82, 0); // LDTR
    segment(&mut v, 0x80, 0, 0, 0); // IDTR
    segment(&mut v, 0x90, 0, tr, 0); // TR
    put_u64(&mut v, 0xd0, 0x1000); // EFER: SVME, as KVM sets it
    put_u64(&mut v, 0x148, 0x40); // CR4: MCE
    put_u64(&mut v, 0x158, 0x10); // CR0: ET
    put_u64(&mut v, 0x160, 0x400); // DR7
    put_u64(&mut v, 0x168, 0xffff_0ff0); // DR6
    put_u64(&mut v, 0x170, 0x2); // RFLAGS
    put_u64(&mut v, 0x178, u64::from(eip & 0xffff)); // RIP
    put_u64(&mut v, 0x268, g_pat);
    put_u64(&mut v, 0x310, rdx);
    put_u64(&mut v, 0x3b0, features); // SEV_FEATURES
    put_u64(&mut v, 0x3e8, 0x1); // XCR0
    v[0x408..0x40c].copy_from_slice(&u32::to_le_bytes(mxcsr));
    v[0x410..0x412].copy_from_slice(&u16::to_le_bytes(fcw));
    v
}

/// What one launch is measured from, past the firmware pages.
pub struct Launch<'a> {
    /// The firmware's checked table and metadata.
    pub firmware: &'a Firmware,
    /// The firmware pages' launch digest.
    pub firmware_digest: [u8; 48],
    /// The kernel hashes page (a whole page, table at its offset), for measured direct boot.
    pub kernel_hashes_page: Option<&'a [u8]>,
    /// The VMM.
    pub vmm: Vmm,
    /// vCPU count.
    pub vcpus: u32,
    /// CPUID signature (QEMU puts it in RDX at reset).
    pub cpu_signature: u32,
    /// SEV_FEATURES.
    pub features: u64,
}

impl Launch<'_> {
    /// The launch digest.
    pub fn digest(&self) -> [u8; 48] {
        let mut chain = Chain(self.firmware_digest);
        let sections = &self.firmware.sections;
        for s in sections {
            match s.kind {
                SEC_MEM if self.vmm == Vmm::Gce => chain.blank_pages(PageType::Unmeasured, s),
                SEC_MEM | SVSM_CAA => chain.blank_pages(PageType::Zero, s),
                SECRETS => chain.update(PageType::Secrets, u64::from(s.gpa), &[0; 48]),
                CPUID if self.vmm != Vmm::Ec2 => {
                    chain.update(PageType::Cpuid, u64::from(s.gpa), &[0; 48])
                }
                KERNEL_HASHES => match self.kernel_hashes_page {
                    Some(page) => chain.page(PageType::Normal, u64::from(s.gpa), page),
                    None => chain.blank_pages(PageType::Zero, s),
                },
                // EC2's CPUID pages, after the others below; the parser admits no other type.
                _ => {}
            }
        }
        if self.vmm == Vmm::Ec2 {
            for s in sections.iter().filter(|s| s.kind == CPUID) {
                chain.update(PageType::Cpuid, u64::from(s.gpa), &[0; 48]);
            }
        }
        let bsp = vmsa(self.vmm, BSP_EIP, self.cpu_signature, self.features);
        let ap = vmsa(
            self.vmm,
            self.firmware.reset_eip,
            self.cpu_signature,
            self.features,
        );
        for cpu in 0..self.vcpus {
            let page = if cpu == 0 { &bsp } else { &ap };
            chain.page(PageType::Vmsa, VMSA_GPA, page);
        }
        chain.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmsa_fields_sit_at_the_apm_offsets() {
        let v = vmsa(Vmm::Qemu, BSP_EIP, 0xa10f11, 0x21);
        assert_eq!(&v[0x10..0x12], &0xf000u16.to_le_bytes()); // CS selector
        assert_eq!(&v[0x18..0x20], &0xffff_0000u64.to_le_bytes()); // CS base
        assert_eq!(&v[0x178..0x180], &0xfff0u64.to_le_bytes()); // RIP
        assert_eq!(&v[0x310..0x318], &0xa10f11u64.to_le_bytes()); // RDX
        assert_eq!(&v[0x3b0..0x3b8], &0x21u64.to_le_bytes()); // SEV_FEATURES
        let ec2_bsp = vmsa(Vmm::Ec2, BSP_EIP, 0xa10f11, 1);
        let ec2_ap = vmsa(Vmm::Ec2, 0x0080_b004, 0xa10f11, 1);
        assert_eq!(ec2_bsp[0x12], 0x9a);
        assert_eq!(ec2_ap[0x12], 0x9b);
        assert_eq!(&ec2_ap[0x310..0x318], &0x600u64.to_le_bytes());
        let gce = vmsa(Vmm::Gce, BSP_EIP, 0xa10f11, 1);
        assert_eq!(&gce[0x268..0x270], &0x0007_0106u64.to_le_bytes());
        assert_eq!(&gce[0x408..0x40c], &[0; 4]);
    }

    #[test]
    fn the_vmms_differ_and_ec2_moves_the_cpuid_page_last() {
        let firmware = Firmware {
            sections: vec![
                Section {
                    gpa: 0x80_0000,
                    size: 0x9000,
                    kind: SEC_MEM,
                },
                Section {
                    gpa: 0x80_d000,
                    size: 0x1000,
                    kind: CPUID,
                },
                Section {
                    gpa: 0x80_e000,
                    size: 0x1000,
                    kind: SECRETS,
                },
            ],
            reset_eip: 0x0080_b004,
            kernel_hashes: false,
            hash_table_gpa: None,
        };
        let launch = |vmm| {
            Launch {
                firmware: &firmware,
                firmware_digest: [7; 48],
                kernel_hashes_page: None,
                vmm,
                vcpus: 2,
                cpu_signature: 0xa10f11,
                features: 1,
            }
            .digest()
        };
        let (q, e, g) = (launch(Vmm::Qemu), launch(Vmm::Ec2), launch(Vmm::Gce));
        assert!(q != e && e != g && q != g);
        // EC2 by hand: secure memory, secrets, then CPUID, then the VMSAs.
        let mut chain = Chain([7; 48]);
        chain.blank_pages(PageType::Zero, &firmware.sections[0]);
        chain.update(PageType::Secrets, 0x80_e000, &[0; 48]);
        chain.update(PageType::Cpuid, 0x80_d000, &[0; 48]);
        chain.page(PageType::Vmsa, VMSA_GPA, &vmsa(Vmm::Ec2, BSP_EIP, 0, 1));
        chain.page(PageType::Vmsa, VMSA_GPA, &vmsa(Vmm::Ec2, 0x0080_b004, 0, 1));
        assert_eq!(chain.0, e);
    }
}
