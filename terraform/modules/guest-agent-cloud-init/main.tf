locals {
  agent_config = templatefile("${path.module}/config.toml.tftpl", {
    broker_url    = var.broker_url == null ? "" : trimsuffix(var.broker_url, "/")
    brokers       = [for b in var.brokers : trimsuffix(b, "/")]
    platform      = var.platform
    deadline_secs = var.deadline_secs
    secrets       = var.secrets
    certificates  = var.certificates
  })

  # Copies of guest-agent/systemd/ (the module is self-contained; `make test` checks they match).
  service_unit = file("${path.module}/files/guest-agent.service")
  target_unit  = file("${path.module}/files/snp-secrets.target")
  renew_units = length(var.certificates) == 0 ? [] : [
    { path = "/etc/systemd/system/guest-agent-renew.service", permissions = "0644", owner = "root:root", content = file("${path.module}/files/guest-agent-renew.service") },
    { path = "/etc/systemd/system/guest-agent-renew.timer", permissions = "0644", owner = "root:root", content = file("${path.module}/files/guest-agent-renew.timer") },
  ]

  fetch = startswith(var.agent_source, "https://") ? "curl --fail --silent --show-error --location --proto '=https' --tlsv1.2 -o /usr/local/bin/guest-agent.new '${var.agent_source}'" : "cp '${var.agent_source}' /usr/local/bin/guest-agent.new"

  install = join(" && ", [
    "set -eu",
    local.fetch,
    "echo '${var.agent_sha256}  /usr/local/bin/guest-agent.new' | sha256sum --check --strict -",
    "install -m 0755 /usr/local/bin/guest-agent.new /usr/local/bin/guest-agent",
    "rm -f /usr/local/bin/guest-agent.new",
    "/usr/local/bin/guest-agent --config /etc/guest-agent/config.toml config-check",
    "systemctl daemon-reload",
    "systemctl enable guest-agent.service snp-secrets.target",
    "systemctl start snp-secrets.target",
    length(var.certificates) == 0 ? "true" : "systemctl enable --now guest-agent-renew.timer",
  ])

  cloud_config = {
    # Installed (config stage) before runcmd (final stage) runs the agent.
    package_update = length(var.runtime_packages) > 0
    packages       = var.runtime_packages
    write_files = concat([
      { path = "/etc/guest-agent/config.toml", permissions = "0644", owner = "root:root", content = local.agent_config },
      { path = "/etc/guest-agent/broker-ca.pem", permissions = "0644", owner = "root:root", content = var.broker_ca_pem },
      { path = "/etc/systemd/system/guest-agent.service", permissions = "0644", owner = "root:root", content = local.service_unit },
      { path = "/etc/systemd/system/snp-secrets.target", permissions = "0644", owner = "root:root", content = local.target_unit },
    ], local.renew_units)
    runcmd = [["sh", "-c", local.install]]
  }

  user_data = "#cloud-config\n${yamlencode(local.cloud_config)}"
}
