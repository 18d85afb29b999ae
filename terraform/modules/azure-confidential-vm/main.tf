terraform {
  required_version = ">= 1.6"
  required_providers {
    azurerm = {
      source  = "hashicorp/azurerm"
      version = ">= 4.0, < 5.0"
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
  # Azure CVMs expose the SNP report through the vTPM only.
  platform = "azure-vtpm"
  secrets  = var.agent.secrets
}

resource "azurerm_network_interface" "this" {
  name                = "${var.name}-nic"
  location            = var.location
  resource_group_name = var.resource_group_name

  ip_configuration {
    name                          = "internal"
    subnet_id                     = var.subnet_id
    private_ip_address_allocation = "Dynamic"
  }
}

# An Azure confidential VM (DCasv5/ECasv5, AMD SEV-SNP) with vTPM, secure boot and a
# confidential OS disk.
resource "azurerm_linux_virtual_machine" "this" {
  name                            = var.name
  location                        = var.location
  resource_group_name             = var.resource_group_name
  size                            = var.size
  admin_username                  = var.admin_username
  disable_password_authentication = true
  network_interface_ids           = [azurerm_network_interface.this.id]
  vtpm_enabled                    = true
  secure_boot_enabled             = true
  custom_data                     = module.agent.user_data_base64
  allow_extension_operations      = false

  admin_ssh_key {
    username   = var.admin_username
    public_key = var.admin_ssh_public_key
  }

  os_disk {
    caching                  = "ReadWrite"
    storage_account_type     = "Premium_LRS"
    security_encryption_type = var.security_encryption_type
  }

  source_image_reference {
    publisher = "Canonical"
    offer     = "0001-com-ubuntu-confidential-vm-jammy"
    sku       = "22_04-lts-cvm"
    version   = "latest"
  }

  tags = var.tags
}
