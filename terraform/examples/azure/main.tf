# An Azure confidential VM (DCasv5). Its agent uses the vTPM evidence path (platform
# azure-vtpm), which the agent does not support yet: see docs/terraform.md.
provider "azurerm" {
  features {}
}

module "web" {
  source               = "../../modules/azure-confidential-vm"
  name                 = "web-1"
  location             = var.location
  resource_group_name  = var.resource_group_name
  subnet_id            = var.subnet_id
  size                 = "Standard_DC2as_v5"
  admin_ssh_public_key = file(var.ssh_public_key_file)
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

variable "location" {
  type = string
}

variable "resource_group_name" {
  type = string
}

variable "subnet_id" {
  type = string
}

variable "ssh_public_key_file" {
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

output "private_ip" {
  value = module.web.private_ip
}
