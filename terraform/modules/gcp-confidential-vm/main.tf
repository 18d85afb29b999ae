terraform {
  required_version = ">= 1.6"
  required_providers {
    google = {
      source  = "hashicorp/google"
      version = ">= 6.0, < 7.0"
    }
  }
}

module "agent" {
  source        = "../guest-agent-cloud-init"
  broker_url    = var.agent.broker_url
  brokers       = var.agent.brokers
  broker_ca_pem = var.agent.broker_ca_pem
  agent_source  = var.agent.source
  agent_sha256  = var.agent.sha256
  platform      = "auto"
  secrets       = var.agent.secrets
}

# A Compute Engine confidential VM with AMD SEV-SNP, shielded (secure boot, vTPM).
resource "google_compute_instance" "this" {
  name             = var.name
  zone             = var.zone
  machine_type     = var.machine_type
  min_cpu_platform = "AMD Milan"

  confidential_instance_config {
    confidential_instance_type = "SEV_SNP"
  }

  scheduling {
    on_host_maintenance = "TERMINATE"
    automatic_restart   = true
  }

  shielded_instance_config {
    enable_secure_boot          = true
    enable_vtpm                 = true
    enable_integrity_monitoring = true
  }

  boot_disk {
    initialize_params {
      image = var.image
    }
  }

  network_interface {
    subnetwork = var.subnetwork
  }

  metadata = {
    user-data              = module.agent.user_data
    block-project-ssh-keys = "true"
  }

  labels = var.labels
}
