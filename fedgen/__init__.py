"""fedgen: privacy-audited federated generation of health data.

Importing fedgen tunes this process's allocator for PyTorch on CPU (``fedgen.memory``): every
fedgen process — a command, a simulated site, a site's Flower app — imports it before its work.
"""

from fedgen.memory import keep_freed_memory

keep_freed_memory()
