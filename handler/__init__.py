"""enquiry-handler: answers second-opinion enquiries sent by email or SMS."""

__version__ = "0.1.0"
