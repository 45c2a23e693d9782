"""One APIRouter per concern: scoring (/score, /select), models (/models), health."""
