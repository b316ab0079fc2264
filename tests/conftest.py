pytest_plugins = ("lab.plugin",)
