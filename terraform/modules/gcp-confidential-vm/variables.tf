variable "name" {
  type = string
}

variable "zone" {
  type = string
}

variable "machine_type" {
  description = "An N2D machine type (AMD Milan or later), as SEV-SNP requires."
  type        = string
  default     = "n2d-standard-2"
  validation {
    condition     = can(regex("^n2d-", var.machine_type))
    error_message = "machine_type must be an n2d type: SEV-SNP confidential VMs run on N2D."
  }
}

variable "image" {
  description = "An image that supports SEV-SNP (for example ubuntu-os-cloud/ubuntu-2404-lts-amd64)."
  type        = string
}

variable "subnetwork" {
  type = string
}

variable "labels" {
  type    = map(string)
  default = {}
}

variable "agent" {
  description = "The guest agent's settings, forwarded to the guest-agent-cloud-init module (which validates them): broker_url (or brokers, a list), broker_ca_pem, source (https URL or absolute path), sha256, secrets."
  type = object({
    broker_url    = optional(string)
    brokers       = optional(list(string), [])
    broker_ca_pem = string
    source        = string
    sha256        = string
    secrets = list(object({
      name     = string
      path     = optional(string)
      owner    = optional(string, "root")
      group    = optional(string, "root")
      mode     = optional(string, "0400")
      required = optional(bool, true)
    }))
  })
}
