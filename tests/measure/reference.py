"""Reference launch measurements from sev-snp-measure (PyPI), an implementation independent of
the broker's, for tests/tests/measure.rs.

Reads one JSON case per line on stdin and writes one line per case: the 96-hex-digit launch
digest, or "error: ..." when sev-snp-measure refuses the inputs. A case is
{"ovmf": PATH, "vcpus": N, "vcpu_type": NAME, "vmm": "qemu"|"ec2"|"gce", "guest_features": INT,
 "ovmf_hash": HEX or null, "kernel": PATH or null, "initrd": PATH or null,
 "append": STR or null}, or {"ovmf_hash_of": PATH} for the firmware pages' digest alone.
"""
import json
import sys

from sevsnpmeasure import guest, vcpu_types
from sevsnpmeasure.vmm_types import VMMType

VMM = {"qemu": VMMType.QEMU, "ec2": VMMType.ec2, "gce": VMMType.gce}
# Model versions this release of sev-snp-measure does not list share their family's signature.
EXTRA_SIGS = {
    "EPYC-Turin-v1": vcpu_types.CPU_SIGS["EPYC-Turin"],
    "EPYC-Turin-v2": vcpu_types.CPU_SIGS["EPYC-Turin"],
}


def main() -> None:
    for line in sys.stdin:
        case = json.loads(line)
        try:
            if "ovmf_hash_of" in case:
                out = guest.calc_snp_ovmf_hash(case["ovmf_hash_of"]).hex()
            else:
                name = case["vcpu_type"]
                sig = vcpu_types.CPU_SIGS.get(name, EXTRA_SIGS.get(name))
                if sig is None:
                    raise ValueError(f"unknown vCPU type {name}")
                out = guest.snp_calc_launch_digest(
                    case["vcpus"], sig, case["ovmf"], case.get("kernel"), case.get("initrd"),
                    case.get("append"), case["guest_features"], case.get("ovmf_hash") or "",
                    VMM[case["vmm"]]).hex()
        except Exception as e:  # noqa: BLE001 - reported to the test, which fails on it
            out = f"error: {type(e).__name__}: {e}"
        print(out, flush=True)


if __name__ == "__main__":
    main()
