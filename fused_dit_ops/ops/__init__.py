"""Op registrations. Importing a module here registers its CUDA, CPU and fake implementations."""
from . import modulation  # noqa: F401
from . import attention  # noqa: F401
from . import qkv_cat  # noqa: F401
from . import rope  # noqa: F401
from . import linear  # noqa: F401
from . import fp8  # noqa: F401
from . import swiglu  # noqa: F401
from . import qk_norm_across_heads  # noqa: F401
from . import gate_residual_norm  # noqa: F401
from . import attention_fp8  # noqa: F401
