terraform {
  required_version = ">= 1.6"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 6.0, < 7.0"
    }
  }
}

module "agent" {
  source        = "../guest-agent-cloud-init"
  broker_url    = var.agent.broker_url
  brokers       = var.agent.brokers
  broker_ca_pem = var.agent.broker_ca_pem
  agent_source  = var.agent.source
  agent_sha256  = var.agent.sha256
  platform      = "auto"
  secrets       = var.agent.secrets
}

# An EC2 instance with AMD SEV-SNP. AWS guests are signed by a VLEK, which the agent sends
# from its certificate table (configfs-tsm auxblob).
resource "aws_instance" "this" {
  ami                         = var.ami
  instance_type               = var.instance_type
  subnet_id                   = var.subnet_id
  vpc_security_group_ids      = var.security_group_ids
  key_name                    = var.key_name
  user_data                   = module.agent.user_data
  user_data_replace_on_change = true
  ebs_optimized               = true
  monitoring                  = true

  cpu_options {
    amd_sev_snp = "enabled"
  }

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  root_block_device {
    encrypted   = true
    volume_type = "gp3"
  }

  tags = merge(var.tags, { Name = var.name })
}
