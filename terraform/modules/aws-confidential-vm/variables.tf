variable "name" {
  description = "Instance name."
  type        = string
}

variable "ami" {
  description = "A UEFI AMI with a kernel that supports SEV-SNP guests (Linux 6.7+ for configfs-tsm)."
  type        = string
}

variable "instance_type" {
  description = "An instance type with AMD SEV-SNP: m6a, c6a or r6a."
  type        = string
  default     = "m6a.large"
  validation {
    condition     = can(regex("^(m6a|c6a|r6a)\\.[0-9]*x?large$", var.instance_type))
    error_message = "instance_type must be an m6a, c6a or r6a size: only these offer AMD SEV-SNP."
  }
}

variable "subnet_id" {
  type = string
}

variable "security_group_ids" {
  type    = list(string)
  default = []
}

variable "key_name" {
  type    = string
  default = null
}

variable "tags" {
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
