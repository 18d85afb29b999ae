variable "name" {
  type = string
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

variable "size" {
  description = "A confidential VM size with AMD SEV-SNP: DCasv5 or ECasv5 (also DCadsv5/ECadsv5)."
  type        = string
  default     = "Standard_DC2as_v5"
  validation {
    condition     = can(regex("^Standard_(DC|EC)[0-9]+ad?s_v5$", var.size))
    error_message = "size must be a DCasv5/ECasv5 (or DCadsv5/ECadsv5) size: only these are AMD SEV-SNP confidential VMs."
  }
}

variable "security_encryption_type" {
  description = "Confidential OS disk: VMGuestStateOnly, or DiskWithVMGuestState (the disk is encrypted with a key bound to the vTPM)."
  type        = string
  default     = "DiskWithVMGuestState"
  validation {
    condition     = contains(["VMGuestStateOnly", "DiskWithVMGuestState"], var.security_encryption_type)
    error_message = "security_encryption_type must be VMGuestStateOnly or DiskWithVMGuestState."
  }
}

variable "admin_username" {
  type    = string
  default = "azureuser"
}

variable "admin_ssh_public_key" {
  type = string
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
