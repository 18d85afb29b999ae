# The broker itself on a GCP VM: its binary (checksummed), configuration and TLS material
# written by cloud-init, run by systemd. The master key is passed as a sensitive variable and
# written 0600; keep it in a secret manager, not in tfvars files.
provider "google" {
  project = var.project
}

locals {
  broker_toml = <<-TOML
    listen = "0.0.0.0:8443"

    [tls]
    cert = "/etc/broker/server.pem"
    key = "/etc/broker/server.key"
    operator_ca = "/etc/broker/operator-ca.pem"

    [store]
    sqlite = "/var/lib/broker/broker.db"

    [master_key]
    file = "/etc/broker/master.key"
  TOML

  unit = <<-UNIT
    [Unit]
    Description=SEV-SNP key broker
    After=network-online.target
    Wants=network-online.target

    [Service]
    ExecStart=/usr/local/bin/broker serve --config /etc/broker/broker.toml
    Restart=on-failure
    StateDirectory=broker
    NoNewPrivileges=yes
    ProtectSystem=strict
    ReadWritePaths=/var/lib/broker

    [Install]
    WantedBy=multi-user.target
  UNIT

  cloud_config = {
    write_files = [
      { path = "/etc/broker/broker.toml", permissions = "0644", content = local.broker_toml },
      { path = "/etc/broker/server.pem", permissions = "0644", content = var.server_cert_pem },
      { path = "/etc/broker/server.key", permissions = "0600", content = var.server_key_pem },
      { path = "/etc/broker/operator-ca.pem", permissions = "0644", content = var.operator_ca_pem },
      { path = "/etc/broker/master.key", permissions = "0600", content = var.master_key_hex },
      { path = "/etc/systemd/system/broker.service", permissions = "0644", content = local.unit },
    ]
    runcmd = [["sh", "-c", join(" && ", [
      "set -eu",
      "curl --fail --silent --show-error --location --proto '=https' -o /usr/local/bin/broker.new '${var.broker_source}'",
      "echo '${var.broker_sha256}  /usr/local/bin/broker.new' | sha256sum --check --strict -",
      "install -m 0755 /usr/local/bin/broker.new /usr/local/bin/broker",
      "systemctl daemon-reload",
      "systemctl enable --now broker.service",
    ])]]
  }
}

resource "google_compute_instance" "broker" {
  name             = "snp-key-broker"
  zone             = var.zone
  machine_type     = "n2d-standard-2"
  min_cpu_platform = "AMD Milan"

  # The broker holds every secret: run it confidential too.
  confidential_instance_config {
    confidential_instance_type = "SEV_SNP"
  }

  scheduling {
    on_host_maintenance = "TERMINATE"
  }

  shielded_instance_config {
    enable_secure_boot          = true
    enable_vtpm                 = true
    enable_integrity_monitoring = true
  }

  boot_disk {
    initialize_params {
      image = "ubuntu-os-cloud/ubuntu-2404-lts-amd64"
    }
  }

  network_interface {
    subnetwork = var.subnetwork
  }

  metadata = {
    user-data              = "#cloud-config\n${yamlencode(local.cloud_config)}"
    block-project-ssh-keys = "true"
  }
}

variable "project" {
  type = string
}

variable "zone" {
  type = string
}

variable "subnetwork" {
  type = string
}

variable "broker_source" {
  description = "https URL of the broker binary."
  type        = string
  validation {
    condition     = startswith(var.broker_source, "https://")
    error_message = "broker_source must be https."
  }
}

variable "broker_sha256" {
  type = string
  validation {
    condition     = can(regex("^[0-9a-f]{64}$", var.broker_sha256))
    error_message = "broker_sha256 must be 64 hex digits."
  }
}

variable "server_cert_pem" {
  type = string
}

variable "server_key_pem" {
  type      = string
  sensitive = true
}

variable "operator_ca_pem" {
  type = string
}

variable "master_key_hex" {
  type      = string
  sensitive = true
  validation {
    condition     = can(regex("^[0-9a-f]{64}$", var.master_key_hex))
    error_message = "master_key_hex must be 64 hex digits (openssl rand -hex 32)."
  }
}

output "broker_ip" {
  value = google_compute_instance.broker.network_interface[0].network_ip
}
