# Renders the cloud-init module with sample inputs, for checks of the output itself
# (`cloud-init schema`, `guest-agent config-check`). Provider-free: applies offline.
module "agent" {
  source        = "../../modules/guest-agent-cloud-init"
  broker_url    = "https://broker.internal:8443"
  broker_ca_pem = "-----BEGIN CERTIFICATE-----\nMIIBdDCCARqgAwIBAgIUTestCaOnlyForRendering0000000wCgYIKoZIzj0EAwIw\n-----END CERTIFICATE-----\n"
  agent_source  = "https://downloads.example.com/guest-agent-0.1.0-x86_64"
  agent_sha256  = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0"
  secrets = [
    { name = "web-tls", group = "www-data", mode = "0440" },
    { name = "db-key" },
    { name = "metrics-token", path = "/run/app/metrics", required = false },
  ]
  certificates = [
    { profile = "web", dns = ["web.example.internal"], uri = ["spiffe://example.internal/web"], group = "www-data", key_mode = "0440", reload = ["/usr/bin/systemctl", "reload", "nginx"] },
  ]
}

output "user_data" {
  value = module.agent.user_data
}

output "agent_config" {
  value = module.agent.agent_config
}
