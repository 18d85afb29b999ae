# Offline checks of the rendered user data and of input validation (no provider needed).

variables {
  broker_url    = "https://broker.internal:8443"
  broker_ca_pem = "-----BEGIN CERTIFICATE-----\nMIIBdDCCARqgAwIBAgIUTestCaOnlyForRendering0000000wCgYIKoZIzj0EAwIw\n-----END CERTIFICATE-----\n"
  agent_source  = "https://downloads.example.com/guest-agent-0.1.0-x86_64"
  agent_sha256  = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0"
  secrets = [
    { name = "web-tls", group = "www-data", mode = "0440" },
    { name = "db-key" },
    { name = "metrics-token", path = "/run/app/metrics", required = false },
  ]
}

run "renders_config_units_and_install" {
  command = plan

  assert {
    condition     = startswith(output.user_data, "#cloud-config\n")
    error_message = "user data must start with #cloud-config"
  }
  assert {
    condition     = strcontains(output.agent_config, "broker_url = \"https://broker.internal:8443\"")
    error_message = "config must carry the broker URL"
  }
  assert {
    condition     = strcontains(output.agent_config, "name = \"web-tls\"\nowner = \"root\"\ngroup = \"www-data\"\nmode = \"0440\"\nrequired = true")
    error_message = "config must carry web-tls with its owner, group and mode"
  }
  assert {
    condition     = strcontains(output.agent_config, "path = \"/run/app/metrics\"") && strcontains(output.agent_config, "required = false")
    error_message = "config must carry the optional secret and its path"
  }
  assert {
    condition     = strcontains(output.user_data, "Type=oneshot") && strcontains(output.user_data, "RemainAfterExit=yes")
    error_message = "user data must install the oneshot unit"
  }
  assert {
    condition     = strcontains(output.user_data, "sha256sum --check --strict") && strcontains(output.user_data, var.agent_sha256)
    error_message = "the binary's SHA-256 must be checked before install"
  }
  assert {
    condition     = strcontains(output.user_data, "systemctl enable guest-agent.service snp-secrets.target")
    error_message = "the agent must be enabled"
  }
  assert {
    condition     = strcontains(output.user_data, "\"libtss2-esys-3.0.2-0\"") && strcontains(output.user_data, "\"package_update\": true")
    error_message = "the agent's run-time libraries are installed"
  }
  assert {
    condition     = base64decode(output.user_data_base64) == output.user_data
    error_message = "the base64 output must encode the user data"
  }
}

run "no_certificates_no_renewal_timer" {
  command = plan
  assert {
    condition     = !strcontains(output.user_data, "guest-agent-renew") && !strcontains(output.agent_config, "[[certificate]]")
    error_message = "without certificates nothing about renewal is installed"
  }
}

run "certificates_render_and_enable_the_renewal_timer" {
  command = plan
  variables {
    certificates = [
      { profile = "web", dns = ["web.example.internal"], uri = ["spiffe://example.internal/web"], reload = ["/usr/bin/systemctl", "reload", "nginx"] },
      { profile = "client", name = "svc-client", ip = ["10.0.0.7"], ocsp = false },
    ]
  }
  assert {
    condition     = strcontains(output.agent_config, "[[certificate]]\nprofile = \"web\"\ndns = [\"web.example.internal\"]\nuri = [\"spiffe://example.internal/web\"]")
    error_message = "the web certificate renders with its names"
  }
  assert {
    condition     = strcontains(output.agent_config, "reload = [\"/usr/bin/systemctl\",\"reload\",\"nginx\"]") && strcontains(output.agent_config, "name = \"svc-client\"") && strcontains(output.agent_config, "ocsp = false")
    error_message = "reload, name and ocsp render"
  }
  assert {
    condition     = strcontains(output.user_data, "/etc/systemd/system/guest-agent-renew.timer") && strcontains(output.user_data, "systemctl enable --now guest-agent-renew.timer")
    error_message = "the renewal units are installed and the timer enabled"
  }
}

run "certificates_only_is_enough" {
  command = plan
  variables {
    secrets      = []
    certificates = [{ profile = "web", dns = ["web.example.internal"] }]
  }
  assert {
    condition     = strcontains(output.agent_config, "profile = \"web\"") && !strcontains(output.agent_config, "[[secrets]]")
    error_message = "a VM may ask only for a certificate"
  }
}

run "rejects_a_reload_command_found_on_path" {
  command = plan
  variables {
    certificates = [{ profile = "web", dns = ["web.example.internal"], reload = ["systemctl", "reload", "nginx"] }]
  }
  expect_failures = [var.certificates]
}

run "rejects_a_certificate_without_names" {
  command = plan
  variables {
    certificates = [{ profile = "web" }]
  }
  expect_failures = [var.certificates]
}

run "local_binary_is_copied" {
  command = plan
  variables {
    agent_source = "/opt/guest-agent/guest-agent"
  }
  assert {
    condition     = strcontains(output.user_data, "cp '/opt/guest-agent/guest-agent'") && !strcontains(output.user_data, "curl")
    error_message = "an absolute path is copied, not downloaded"
  }
}

run "rejects_plain_http_broker" {
  command = plan
  variables {
    broker_url = "http://broker.internal:8443"
  }
  expect_failures = [var.broker_url]
}

run "rejects_a_ca_that_is_not_pem" {
  command = plan
  variables {
    broker_ca_pem = "not a certificate"
  }
  expect_failures = [var.broker_ca_pem]
}

run "rejects_a_bad_checksum" {
  command = plan
  variables {
    agent_sha256 = "abc"
  }
  expect_failures = [var.agent_sha256]
}

run "rejects_http_download" {
  command = plan
  variables {
    agent_source = "http://downloads.example.com/guest-agent"
  }
  expect_failures = [var.agent_source]
}

run "rejects_world_readable_secrets" {
  command = plan
  variables {
    secrets = [{ name = "db-key", mode = "0444" }]
  }
  expect_failures = [var.secrets]
}

run "rejects_bad_secret_names" {
  command = plan
  variables {
    secrets = [{ name = "db key;rm" }]
  }
  expect_failures = [var.secrets]
}

run "rejects_no_required_secret" {
  command = plan
  variables {
    secrets = [{ name = "db-key", required = false }]
  }
  expect_failures = [var.secrets]
}

run "rejects_the_simulator" {
  command = plan
  variables {
    platform = "simulated"
  }
  expect_failures = [var.platform]
}

run "renders_a_list_of_brokers" {
  command = plan

  variables {
    broker_url = null
    brokers    = ["https://b1.internal:8443/", "https://b2.internal:8443"]
  }

  assert {
    condition     = strcontains(output.agent_config, "brokers = [\"https://b1.internal:8443\", \"https://b2.internal:8443\"]")
    error_message = "config must carry every broker, without trailing slashes"
  }
  assert {
    condition     = !strcontains(output.agent_config, "broker_url")
    error_message = "a list of brokers replaces broker_url"
  }
}

run "refuses_both_broker_url_and_brokers" {
  command = plan

  variables {
    brokers = ["https://b1.internal:8443"]
  }

  expect_failures = [output.agent_config]
}

run "refuses_a_plain_http_broker_in_the_list" {
  command = plan

  variables {
    broker_url = null
    brokers    = ["https://b1.internal:8443", "http://b2.internal:8443"]
  }

  expect_failures = [var.brokers]
}
