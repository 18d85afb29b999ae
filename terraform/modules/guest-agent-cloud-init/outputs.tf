output "user_data" {
  description = "cloud-init user data (#cloud-config) that installs, configures and starts the guest agent."
  value       = local.user_data
}

output "user_data_base64" {
  description = "The same, base64-encoded (Azure custom_data, AWS user_data_base64)."
  value       = base64encode(local.user_data)
}

output "agent_config" {
  description = "The rendered /etc/guest-agent/config.toml."
  value       = local.agent_config
  precondition {
    condition     = (var.broker_url == null) != (length(var.brokers) == 0)
    error_message = "Set exactly one of broker_url and brokers."
  }
}
