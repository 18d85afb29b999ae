# A GCP SEV-SNP confidential VM whose secrets arrive from the broker at boot.
provider "google" {
  project = var.project
}

module "web" {
  source       = "../../modules/gcp-confidential-vm"
  name         = "web-1"
  zone         = var.zone
  machine_type = "n2d-standard-2"
  image        = "ubuntu-os-cloud/ubuntu-2404-lts-amd64"
  subnetwork   = var.subnetwork
  agent = {
    broker_url    = var.broker_url
    broker_ca_pem = file(var.broker_ca_file)
    source        = var.agent_source
    sha256        = var.agent_sha256
    secrets = [
      { name = "web-tls", group = "www-data", mode = "0440" },
      { name = "db-key" },
    ]
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

variable "broker_url" {
  type = string
}

variable "broker_ca_file" {
  type = string
}

variable "agent_source" {
  type = string
}

variable "agent_sha256" {
  type = string
}

output "internal_ip" {
  value = module.web.internal_ip
}
