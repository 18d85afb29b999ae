# An AWS SEV-SNP instance whose secrets arrive from the broker at boot.
# terraform apply -var-file=aws.tfvars; the policy for it: docs/terraform.md.
provider "aws" {
  region = var.region
}

module "web" {
  source        = "../../modules/aws-confidential-vm"
  name          = "web-1"
  ami           = var.ami
  instance_type = "m6a.large"
  subnet_id     = var.subnet_id
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

variable "region" {
  type = string
}

variable "ami" {
  type = string
}

variable "subnet_id" {
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

output "instance_id" {
  value = module.web.instance_id
}
