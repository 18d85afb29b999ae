variable "broker_url" {
  description = "The key broker's base URL (https). Set this or brokers."
  type        = string
  default     = null
  validation {
    condition     = var.broker_url == null || can(regex("^https://[A-Za-z0-9.-]+(:[0-9]{1,5})?/?$", var.broker_url))
    error_message = "broker_url must be https://host[:port]."
  }
}

variable "brokers" {
  description = "Several brokers' base URLs (https), for replicas without a load balancer in front: the agent tries them in a random order and moves to the next on a transient failure. Set this or broker_url."
  type        = list(string)
  default     = []
  validation {
    condition     = length(var.brokers) <= 32 && alltrue([for b in var.brokers : can(regex("^https://[A-Za-z0-9.-]+(:[0-9]{1,5})?/?$", b))])
    error_message = "brokers: at most 32, each https://host[:port]."
  }
}

variable "broker_ca_pem" {
  description = "The broker's CA certificate (PEM). The agent pins it."
  type        = string
  validation {
    condition     = can(regex("^-----BEGIN CERTIFICATE-----\\n[A-Za-z0-9+/=\\n]+-----END CERTIFICATE-----\\n?$", trimspace(var.broker_ca_pem)))
    error_message = "broker_ca_pem must be one PEM certificate."
  }
}

variable "agent_source" {
  description = "Where the guest-agent binary comes from: an https URL, or an absolute path already on the image."
  type        = string
  validation {
    condition     = can(regex("^(https://[^\\s'\"]+|/[^\\s'\"]+)$", var.agent_source))
    error_message = "agent_source must be an https:// URL or an absolute path, without spaces or quotes."
  }
}

variable "agent_sha256" {
  description = "SHA-256 of the guest-agent binary; it is checked before install."
  type        = string
  validation {
    condition     = can(regex("^[0-9a-f]{64}$", var.agent_sha256))
    error_message = "agent_sha256 must be 64 lower-case hex digits."
  }
}

variable "runtime_packages" {
  description = "Distribution packages the agent binary needs at run time: the TPM software stack (libtss2) it links for the Azure vTPM source. The default names are Debian 12's and Ubuntu 22.04's; set [] if the image has them."
  type        = list(string)
  default     = ["libtss2-esys-3.0.2-0", "libtss2-tctildr0", "libtss2-tcti-device0"]
  validation {
    condition     = alltrue([for p in var.runtime_packages : can(regex("^[a-z0-9][a-z0-9+.-]*$", p))])
    error_message = "runtime_packages must be package names."
  }
}

variable "platform" {
  description = "Evidence source: auto, configfs-tsm, sev-guest or azure-vtpm."
  type        = string
  default     = "auto"
  validation {
    condition     = contains(["auto", "configfs-tsm", "sev-guest", "azure-vtpm"], var.platform)
    error_message = "platform must be auto, configfs-tsm, sev-guest or azure-vtpm (the simulator is never provisioned)."
  }
}

variable "deadline_secs" {
  description = "How long the agent keeps retrying at boot."
  type        = number
  default     = 300
  validation {
    condition     = var.deadline_secs >= 10 && var.deadline_secs <= 3600
    error_message = "deadline_secs must be between 10 and 3600."
  }
}

variable "certificates" {
  description = "Certificates from the broker's CA, for keys made in the guest ([[certificate]] in docs/guest-agent.md): profile, and optionally name (file base name, default the profile), dns, ip, uri (at least one name), owner, group, key_mode, ocsp (keep an OCSP response for stapling, default true) and reload (argv run when the files change; the program by absolute path). With any, the renewal timer is installed and enabled."
  type = list(object({
    profile  = string
    name     = optional(string)
    dns      = optional(list(string), [])
    ip       = optional(list(string), [])
    uri      = optional(list(string), [])
    owner    = optional(string, "root")
    group    = optional(string, "root")
    key_mode = optional(string, "0400")
    ocsp     = optional(bool, true)
    reload   = optional(list(string), [])
  }))
  default = []
  validation {
    condition     = length(var.certificates) <= 8 && alltrue([for c in var.certificates : can(regex("^[A-Za-z0-9._-]{1,128}$", c.profile)) && (c.name == null || can(regex("^[A-Za-z0-9._-]{1,128}$", c.name)))])
    error_message = "at most 8 certificates; profiles and names use letters, digits, '.', '_', '-'."
  }
  validation {
    condition     = alltrue([for c in var.certificates : length(c.dns) + length(c.ip) + length(c.uri) > 0])
    error_message = "each certificate asks for at least one name (dns, ip or uri)."
  }
  validation {
    condition     = alltrue([for c in var.certificates : can(regex("^0?[0-7][0-7]0$", c.key_mode)) && can(regex("^[A-Za-z0-9._-]+$", c.owner)) && can(regex("^[A-Za-z0-9._-]+$", c.group))])
    error_message = "key modes are octal and give no access to others; owners and groups are names or numeric ids."
  }
  validation {
    condition     = alltrue([for c in var.certificates : length(c.reload) == 0 || startswith(try(c.reload[0], ""), "/")])
    error_message = "a reload command starts with its program's absolute path (it runs without a shell)."
  }
}

variable "secrets" {
  description = "Secrets to fetch: name, and optionally path (absolute), owner, group, mode (octal, no access for others) and required."
  type = list(object({
    name     = string
    path     = optional(string)
    owner    = optional(string, "root")
    group    = optional(string, "root")
    mode     = optional(string, "0400")
    required = optional(bool, true)
  }))
  default = []
  validation {
    condition     = (length(var.secrets) > 0 || length(var.certificates) > 0) && alltrue([for s in var.secrets : can(regex("^[A-Za-z0-9._-]{1,128}$", s.name))])
    error_message = "secrets must name at least one secret (or certificates one certificate); names use letters, digits, '.', '_', '-'."
  }
  validation {
    condition     = alltrue([for s in var.secrets : can(regex("^0?[0-7][0-7]0$", s.mode))])
    error_message = "secret modes are octal and give no access to others (at most 0770)."
  }
  validation {
    condition     = alltrue([for s in var.secrets : s.path == null || can(regex("^/[^\\s\"']+$", s.path))])
    error_message = "secret paths must be absolute, without spaces or quotes."
  }
  validation {
    condition     = alltrue([for s in var.secrets : can(regex("^[A-Za-z0-9._-]+$", s.owner)) && can(regex("^[A-Za-z0-9._-]+$", s.group))])
    error_message = "owners and groups are user/group names or numeric ids."
  }
  validation {
    condition     = anytrue([for s in var.secrets : s.required]) || length(var.certificates) > 0
    error_message = "at least one secret must be required (or a certificate asked for)."
  }
  validation {
    condition     = length(distinct([for s in var.secrets : s.name])) == length(var.secrets)
    error_message = "each secret is listed once."
  }
}
